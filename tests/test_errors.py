"""Bad input is part of the contract: every public function given a
wrong shape, dtype, device or value raises ValueError/TypeError naming the
argument, before any kernel runs. Nothing is silently clamped or dropped."""
import subprocess
import sys

import pytest
import torch

from dsv3 import MoE, MoEConfig, ops
from dsv3.distributed.compress import CompressionState
from dsv3.ops import backend

I32 = torch.int32
META = "meta"  # a device no CPU tensor is on: stands in for "the wrong device"


def logits(t=4, e=8, **kw):
    return torch.randn(t, e, **kw)


def experts(t=4, k=2, e=8):
    return torch.randint(0, e, (t, k), dtype=I32)


def row_map(t=4, k=2):
    return torch.randperm(t * k).to(I32).view(t, k)


def offsets(*ends):
    return torch.tensor(ends, dtype=I32)


def tokens(*rows):
    return torch.tensor(rows, dtype=I32)


def ids(rows):
    return torch.tensor(rows, dtype=I32)


def nan_logits():
    logits_TE = logits(70, 8)  # past the 64-token grain: the NaN is in the second chunk
    logits_TE[65, 3] = float("nan")
    return logits_TE


ROUTE = [
    # (call, error type, pattern the message must match)
    pytest.param(lambda: ops.route([[1.0, 2.0]], 1), TypeError, "logits_TE",
                 id="logits_not_tensor"),
    pytest.param(lambda: ops.route(torch.randn(8), 2), ValueError, "logits_TE", id="logits_1d"),
    pytest.param(lambda: ops.route(torch.randn(2, 4, 8), 2), ValueError, "logits_TE",
                 id="logits_3d"),
    pytest.param(lambda: ops.route(torch.ones(4, 8, dtype=torch.int64), 2), TypeError, "logits_TE",
                 id="logits_int"),
    pytest.param(lambda: ops.route(logits(0), 2), ValueError, "logits_TE", id="empty_batch"),
    pytest.param(lambda: ops.route(nan_logits(), 2), ValueError, "logits_TE.*NaN",
                 id="nan_logits_softmax"),
    pytest.param(lambda: ops.route(nan_logits(), 2, "sigmoid"), ValueError, "logits_TE.*NaN",
                 id="nan_logits_sigmoid"),
    # +inf would make the softmax NaN; -inf ("never this expert") stays legal
    pytest.param(lambda: ops.route(logits().index_fill(1, torch.tensor([2]), float("inf")), 2),
                 ValueError, "logits_TE.*inf", id="pos_inf_logits"),
    pytest.param(lambda: ops.route(logits(), 2, "sigmoid", torch.tensor([float("nan")] * 8)),
                 ValueError, "bias_E.*finite", id="nan_bias"),
    pytest.param(lambda: ops.route(logits(), 9), ValueError, "top_k", id="top_k_gt_E"),
    pytest.param(lambda: ops.route(logits(), 0), ValueError, "top_k", id="top_k_zero"),
    pytest.param(lambda: ops.route(logits(), 2.0), TypeError, "top_k", id="top_k_float"),
    pytest.param(lambda: ops.route(logits(), True), TypeError, "top_k", id="top_k_bool"),
    pytest.param(lambda: ops.route(logits(e=8), 5, n_groups=4, topk_groups=2), ValueError, "top_k",
                 id="top_k_gt_experts_in_kept_groups"),
    pytest.param(lambda: ops.route(logits(), 2, "relu"), ValueError, "score", id="bad_score"),
    pytest.param(lambda: ops.route(logits(), 2, n_groups=3), ValueError, "n_groups",
                 id="n_groups_not_dividing_E"),
    pytest.param(lambda: ops.route(logits(), 2, n_groups=0), ValueError, "n_groups",
                 id="n_groups_zero"),
    pytest.param(lambda: ops.route(logits(), 2, n_groups=2, topk_groups=3), ValueError,
                 "topk_groups", id="topk_groups_gt_n_groups"),
    pytest.param(lambda: ops.route(logits(), 2, bias_E=torch.zeros(9)), ValueError, "bias_E",
                 id="bias_wrong_shape"),
    pytest.param(lambda: ops.route(logits(), 2, bias_E=torch.zeros(1, 8)), ValueError, "bias_E",
                 id="bias_2d"),
    pytest.param(lambda: ops.route(logits(), 2, bias_E=torch.zeros(8, dtype=I32)), TypeError,
                 "bias_E", id="bias_int"),
    pytest.param(lambda: ops.route(logits(), 2, bias_E=torch.zeros(8, device=META)), ValueError,
                 "bias_E", id="bias_wrong_device"),
]

PERMUTE = [
    pytest.param(lambda: ops.expert_index(experts().long(), 8), TypeError, "experts_TK",
                 id="index_experts_int64"),
    pytest.param(lambda: ops.expert_index(experts().flatten(), 8), ValueError, "experts_TK",
                 id="index_experts_1d"),
    pytest.param(lambda: ops.expert_index(offsets(0, 8), 8), ValueError, "experts_TK",
                 id="index_experts_1d_values"),
    pytest.param(lambda: ops.expert_index(torch.tensor([[0, 8]], dtype=I32), 8), ValueError,
                 "experts_TK", id="index_expert_id_ge_E"),
    pytest.param(lambda: ops.expert_index(torch.tensor([[0, -2]], dtype=I32), 8), ValueError,
                 "experts_TK", id="index_expert_id_lt_minus_1"),
    pytest.param(lambda: ops.expert_index(experts(), 0), ValueError, "n_experts",
                 id="index_n_experts_zero"),
    pytest.param(lambda: ops.expert_index(experts(), 8.0), TypeError, "n_experts",
                 id="index_n_experts_float"),
    # past int64: the schema's own error said "expected int, found int"
    pytest.param(lambda: ops.expert_index(experts(), 2**63), ValueError,
                 r"expert_index: n_experts must be in \[1, 2\*\*63 - 1\]",
                 id="index_n_experts_past_int64"),
    pytest.param(lambda: ops.permute("x", experts(), 8), TypeError, "x_TD", id="x_not_tensor"),
    pytest.param(lambda: ops.permute(torch.randn(4), experts(), 8), ValueError, "x_TD",
                 id="x_1d"),
    pytest.param(lambda: ops.permute(torch.ones(4, 3, dtype=I32), experts(), 8), TypeError, "x_TD",
                 id="x_int"),
    pytest.param(lambda: ops.permute(torch.randn(0, 3), experts(0), 8), ValueError, "x_TD",
                 id="empty_batch"),
    pytest.param(lambda: ops.permute(torch.randn(5, 3), experts(4), 8), ValueError, "experts_TK",
                 id="experts_rows_ne_tokens"),
    pytest.param(lambda: ops.permute(torch.randn(4, 3), experts().long(), 8), TypeError,
                 "experts_TK", id="experts_int64"),
    pytest.param(lambda: ops.permute(torch.randn(1, 3), torch.tensor([[3, 8]], dtype=I32), 8),
                 ValueError, "experts_TK", id="expert_id_out_of_range"),
    pytest.param(lambda: ops.permute(torch.randn(4, 3), experts().to(META), 8), ValueError,
                 "experts_TK", id="experts_wrong_device"),
    pytest.param(lambda: ops.permute(torch.randn(4, 3), experts(), 0), ValueError, "n_experts",
                 id="n_experts_zero"),
    pytest.param(lambda: ops.unpermute(torch.randn(8), row_map()), ValueError, "y_SD", id="y_1d"),
    pytest.param(lambda: ops.unpermute(torch.ones(8, 3, dtype=I32), row_map()), TypeError, "y_SD",
                 id="y_int"),
    pytest.param(lambda: ops.unpermute(torch.randn(9, 3), row_map()), ValueError, "y_SD",
                 id="y_rows_ne_TK"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map().long()), TypeError,
                 "row_map_TK", id="row_map_int64"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map().flatten()), ValueError,
                 "row_map_TK", id="row_map_1d"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map() + 1), ValueError,
                 "row_map_TK", id="row_map_out_of_range"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map() - 1), ValueError,
                 "row_map_TK", id="row_map_negative"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map().to(META)), ValueError,
                 "row_map_TK", id="row_map_wrong_device"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map(), torch.rand(4, 3)), ValueError,
                 "weights_TK", id="weights_wrong_shape"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map(), torch.ones(4, 2, dtype=I32)),
                 TypeError, "weights_TK", id="weights_int"),
    pytest.param(lambda: ops.unpermute(torch.randn(8, 3), row_map(), torch.rand(4, 2, device=META)),
                 ValueError, "weights_TK", id="weights_wrong_device"),
]

GROUPED_MM = [
    pytest.param(lambda: ops.grouped_mm(torch.randn(2, 6, 4), torch.randn(2, 4, 5), offsets(3, 6)),
                 ValueError, "x_SX", id="x_3d"),
    pytest.param(lambda: ops.grouped_mm(torch.ones(6, 4, dtype=I32), torch.randn(2, 4, 5),
                                        offsets(3, 6)), TypeError, "x_SX", id="x_int"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(4, 5), offsets(3, 6)),
                 ValueError, "w_EXY", id="w_2d"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5).double(),
                                        offsets(3, 6)), TypeError, "w_EXY", id="w_dtype_mismatch"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 5, 4), offsets(3, 6)),
                 ValueError, "w_EXY", id="w_wrong_X"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5, device=META),
                                        offsets(3, 6)), ValueError, "w_EXY", id="w_wrong_device"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5),
                                        offsets(3, 6).long()), TypeError, "offsets_E",
                 id="offsets_int64"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5), offsets(2, 4, 6)),
                 ValueError, "offsets_E", id="offsets_wrong_length"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5),
                                        offsets(3, 6).view(1, 2)), ValueError, "offsets_E",
                 id="offsets_2d"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5), offsets(4, 2)),
                 ValueError, "offsets_E", id="offsets_decreasing"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5), offsets(3, 7)),
                 ValueError, "offsets_E", id="offsets_past_S"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5), offsets(-1, 6)),
                 ValueError, "offsets_E", id="offsets_negative"),
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 5),
                                        offsets(3, 6).to(META)), ValueError, "offsets_E",
                 id="offsets_wrong_device"),
]

# The kernels the autograd formulas call (the backward's dgrad, wgrad and combine) read
# offsets_E / row_map_TK values too: every backend rejects bad ones, never reading or
# writing out of bounds first.
KERNEL_VALUES = [
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(6, 4), torch.randn(6, 5),
                                                         offsets(4, 2), False),
                 ValueError, "offsets_E", id="wgrad_offsets_decreasing"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(6, 4), torch.randn(6, 5),
                                                         offsets(3, 9), True),
                 ValueError, "offsets_E", id="wgrad_offsets_past_S"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(6, 4), torch.randn(6, 5),
                                                         offsets(-2, 6), False),
                 ValueError, "offsets_E", id="wgrad_offsets_negative"),
    # no output columns / no weight rows: nothing to compute, the offsets still checked
    pytest.param(lambda: ops.grouped_mm(torch.randn(6, 4), torch.randn(2, 4, 0), offsets(4, 2)),
                 ValueError, "offsets_E", id="offsets_decreasing_no_columns"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(6, 0), torch.randn(6, 5),
                                                         offsets(3, 9), False),
                 ValueError, "offsets_E", id="wgrad_offsets_past_S_empty_output"),
    pytest.param(lambda: ops.gather_grouped_mm(torch.randn(3, 4), torch.randn(2, 4, 5),
                                               offsets(5, 2), row_map(3, 2)),
                 ValueError, "offsets_E", id="gather_offsets_decreasing"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_gather(torch.randn(5, 4), torch.randn(2, 4, 3),
                                                          offsets(2, 5), tokens(0, 1, 2, 3, 9),
                                                          row_map(5, 1)),
                 ValueError, "token_S", id="gather_token_past_x"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(5, 4), torch.randn(5, 3),
                                                         offsets(2, 5), False,
                                                         tokens(0, -1, 2, 3, 4)),
                 ValueError, "token_S", id="wgrad_token_negative"),
    # X <= Y: the Triton wgrad copies the gathered rows before its kernel, and checks them
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(5, 4), torch.randn(5, 6),
                                                         offsets(2, 5), False,
                                                         tokens(0, 1, 2, 7, 4)),
                 ValueError, "token_S", id="wgrad_token_past_x_copied_first"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(5), torch.randn(5, 6),
                                                         offsets(2, 5), False,
                                                         tokens(0, 1, 2, 3, 4)),
                 ValueError, "x", id="wgrad_gathered_x_1d"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(4, 4), torch.randn(9, 3),
                                                         offsets(2, 9), False),
                 ValueError, "grad_y_SY", id="wgrad_x_rows_ne_grad_rows"),
    # a row map sending two copies to one row leaves a row of the GEMM unmapped: owned
    # by an expert, or a dropped copy's (past offsets_E[-1]), which no kernel reads
    pytest.param(lambda: ops.gather_grouped_mm(torch.randn(2, 4), torch.randn(2, 4, 3),
                                               offsets(2, 4), tokens(0, 1, 1, 3).view(2, 2)),
                 ValueError, "row_map_TK", id="gather_row_map_repeats"),
    pytest.param(lambda: ops.gather_grouped_mm(torch.randn(2, 4), torch.randn(2, 4, 3),
                                               offsets(1, 3), tokens(0, 1, 1, 2).view(2, 2)),
                 ValueError, "row_map_TK", id="gather_row_map_repeats_orphan_dropped"),
    pytest.param(lambda: torch.ops.dsv3.unpermute_backward(torch.randn(4, 3), torch.randn(8),
                                                           row_map(), torch.rand(4, 2)),
                 ValueError, "y_SD", id="unpermute_backward_y_1d"),
    # the forward read a 3-D y_SD's memory as [S, D] rows, and a 1-D one failed unnamed
    pytest.param(lambda: torch.ops.dsv3.unpermute(torch.randn(8), row_map(), None),
                 ValueError, "unpermute: y_SD must be 2-D", id="raw_unpermute_y_1d"),
    pytest.param(lambda: torch.ops.dsv3.unpermute(torch.randn(8, 2, 3), row_map(), None),
                 ValueError, "unpermute: y_SD must be 2-D", id="raw_unpermute_y_3d"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm(torch.randn(5, 4), torch.randn(2, 2, 3),
                                                   offsets(2, 5)),
                 ValueError, "w_EXY", id="raw_grouped_mm_w_too_short"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm(torch.randn(5, 4), torch.randn(3, 4, 3),
                                                   offsets(2, 5)),
                 ValueError, "offsets_E", id="raw_grouped_mm_offsets_fewer_than_E"),
    # BLAS's "expected m1 and m2 to have the same dtype" named neither op nor argument
    pytest.param(lambda: torch.ops.dsv3.grouped_mm(torch.randn(5, 4),
                                                   torch.randn(2, 4, 3, dtype=torch.bfloat16),
                                                   offsets(2, 5)),
                 TypeError, "grouped_mm: x and w_EXY must have one dtype",
                 id="raw_grouped_mm_mixed_dtypes"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_wgrad(torch.randn(5, 4),
                                                         torch.randn(5, 3, dtype=torch.bfloat16),
                                                         offsets(2, 5), False, None),
                 TypeError, "grouped_mm_wgrad: x and grad_y_SY must have one dtype",
                 id="raw_wgrad_mixed_dtypes"),
    # integer routing weights were cast and summed as given
    pytest.param(lambda: torch.ops.dsv3.unpermute(torch.randn(8, 3), row_map(),
                                                  torch.ones(4, 2, dtype=torch.int64)),
                 TypeError, "unpermute: weights_TK must be a floating-point tensor",
                 id="raw_unpermute_integer_weights"),
    pytest.param(lambda: torch.ops.dsv3.grouped_mm_gather(torch.randn(5, 4), torch.randn(2, 4, 3),
                                                          offsets(2, 4), tokens(0, 1, 2, 3).view(2, 2),
                                                          row_map(2, 2)),
                 ValueError, "token_S", id="raw_gather_token_2d"),
    pytest.param(lambda: torch.ops.dsv3.permute_rows(torch.randn(2, 3), row_map()),
                 ValueError, "x_TD", id="permute_rows_fewer_tokens_than_row_map"),
    pytest.param(lambda: torch.ops.dsv3.unpermute(torch.randn(8, 3), row_map(), torch.rand(2, 2)),
                 ValueError, "weights_TK", id="unpermute_weights_fewer_tokens"),
    pytest.param(lambda: torch.ops.dsv3.unpermute_backward(torch.randn(2, 3), torch.randn(8, 3),
                                                           row_map(), torch.rand(4, 2)),
                 ValueError, "grad_y_TD", id="unpermute_backward_grad_fewer_tokens"),
    pytest.param(lambda: torch.ops.dsv3.unpermute_backward(torch.randn(4, 3), torch.randn(8, 3),
                                                           row_map(), torch.rand(4, 1)),
                 ValueError, "weights_TK", id="unpermute_backward_weights_wrong_shape"),
    pytest.param(lambda: torch.ops.dsv3.permute_rows(torch.randn(4, 3), row_map() + 1),
                 ValueError, "row_map_TK", id="permute_rows_row_map_out_of_range"),
    pytest.param(lambda: torch.ops.dsv3.unpermute_backward(torch.randn(4, 3), torch.randn(8, 3),
                                                           row_map() - 1, torch.rand(4, 2)),
                 ValueError, "row_map_TK", id="unpermute_backward_row_map_negative"),
    # route's and route_backward's raw kernels index by expert id, token and slot
    pytest.param(lambda: torch.ops.dsv3.route(torch.randn(4, 16), 2, "sigmoid", torch.zeros(1), 1,
                                              1, True, 1.0, False),
                 ValueError, "bias_E", id="raw_route_bias_shorter_than_E"),
    pytest.param(lambda: torch.ops.dsv3.route_backward(torch.ones(4, 2), None, None,
                                                       torch.randn(4, 8), ids([[0, 1]] * 3 + [[6, 8]]),
                                                       "softmax", True, 1.0),
                 ValueError, "experts_TK", id="raw_route_backward_id_past_E"),
    pytest.param(lambda: torch.ops.dsv3.route_backward(None, torch.ones(8), None,
                                                       torch.randn(4, 8), ids([[0, -1]] * 4),
                                                       "sigmoid", True, 1.0),
                 ValueError, "experts_TK", id="raw_route_backward_id_negative"),
    # 80 experts: the Triton kernel's row is two slabs, and it flags bad ids before its
    # passes over them (one slab: after)
    pytest.param(lambda: torch.ops.dsv3.route_backward(torch.ones(4, 2), torch.ones(80), None,
                                                       torch.randn(4, 80),
                                                       ids([[0, 1]] * 3 + [[79, 80]]),
                                                       "sigmoid", True, 1.0),
                 ValueError, "experts_TK", id="raw_route_backward_id_past_E_two_slabs"),
    pytest.param(lambda: torch.ops.dsv3.route_backward(None, torch.ones(2), None,
                                                       torch.randn(4, 8), ids([[0, 1]] * 4),
                                                       "softmax", True, 1.0),
                 ValueError, "grad_score_sum_E", id="raw_route_backward_score_sum_short"),
    pytest.param(lambda: torch.ops.dsv3.route_backward(torch.ones(2, 2), None, None,
                                                       torch.randn(4, 8), ids([[0, 1]] * 4),
                                                       "softmax", True, 1.0),
                 ValueError, "grad_weights_TK", id="raw_route_backward_grad_fewer_tokens"),
    pytest.param(lambda: torch.ops.dsv3.route_backward(torch.ones(4, 2), None, None,
                                                       torch.randn(4, 8), ids([[0, 1]] * 2),
                                                       "softmax", True, 1.0),
                 ValueError, "experts_TK", id="raw_route_backward_ids_fewer_tokens"),
    pytest.param(lambda: torch.ops.dsv3.route_backward(None, None, torch.ones(0),
                                                       torch.randn(4, 8), ids([[0, 1]] * 4),
                                                       "softmax", True, 1.0),
                 ValueError, "grad_lse_sq_sum", id="raw_route_backward_lse_grad_empty"),
    pytest.param(lambda: torch.ops.dsv3.swiglu_backward(torch.randn(1, 1), torch.randn(64, 64)),
                 ValueError, "grad_a_SF", id="raw_swiglu_backward_grad_wrong_shape"),
    pytest.param(lambda: torch.ops.dsv3.swiglu(torch.randn(4, 7)),
                 ValueError, "h_S2F", id="raw_swiglu_odd_last_dim"),
    pytest.param(lambda: torch.ops.dsv3.swiglu(torch.randn(4, 8), -1.0),
                 ValueError, "limit", id="raw_swiglu_limit_negative"),
    pytest.param(lambda: torch.ops.dsv3.gpt_oss_glu_backward(torch.randn(4, 3), torch.randn(4, 8),
                                                             1.702),
                 ValueError, "grad_a_SF", id="raw_gpt_oss_glu_backward_grad_wrong_shape"),
    pytest.param(lambda: torch.ops.dsv3.gpt_oss_glu(torch.randn(4, 8), float("nan")),
                 ValueError, "alpha", id="raw_gpt_oss_glu_alpha_nan"),
]

SWIGLU = [
    pytest.param(lambda: ops.swiglu(torch.randn(4, 7)), ValueError, "h_S2F", id="odd_last_dim"),
    pytest.param(lambda: ops.swiglu(torch.randn(8)), ValueError, "h_S2F", id="h_1d"),
    pytest.param(lambda: ops.swiglu(torch.ones(4, 8, dtype=I32)), TypeError, "h_S2F", id="h_int"),
    pytest.param(lambda: ops.swiglu([1.0, 2.0]), TypeError, "h_S2F", id="h_not_tensor"),
]

GPT_OSS_GLU = [
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 7)), ValueError, "h_S2F",
                 id="gpt_oss_glu_odd_last_dim"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.ones(4, 8, dtype=I32)), TypeError, "h_S2F",
                 id="gpt_oss_glu_h_int"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), True), TypeError, "alpha",
                 id="gpt_oss_glu_alpha_bool"),
    pytest.param(lambda: ops.gpt_oss_glu(torch.randn(4, 8), 1.702, 0.0), ValueError, "limit",
                 id="gpt_oss_glu_limit_zero"),
]

CONFIG = [
    pytest.param({"top_k": 9}, "top_k", id="top_k_gt_n_experts"),
    pytest.param({"top_k": 0}, "top_k", id="top_k_zero"),
    pytest.param({"top_k": True}, "top_k", id="top_k_bool"),
    pytest.param({"dim": 0}, "dim", id="dim_zero"),
    pytest.param({"ffn_dim": 2.5}, "ffn_dim", id="ffn_dim_float"),
    pytest.param({"score": "relu"}, "score", id="bad_score"),
    pytest.param({"n_groups": 3}, "n_groups", id="n_groups_not_dividing"),
    pytest.param({"n_groups": 2, "topk_groups": 3}, "topk_groups", id="topk_groups_gt_n_groups"),
    pytest.param({"n_groups": 4, "topk_groups": 1, "top_k": 3}, "top_k",
                 id="top_k_gt_experts_in_kept_groups"),
    pytest.param({"capacity_factor": 0.0}, "capacity_factor", id="capacity_zero"),
    pytest.param({"aux_loss_coef": -1.0}, "aux_loss_coef", id="aux_coef_negative"),
    pytest.param({"z_loss_coef": -1.0}, "z_loss_coef", id="z_coef_negative"),
    pytest.param({"bias_update_rate": -1.0}, "bias_update_rate", id="bias_rate_negative"),
    pytest.param({"n_shared_experts": -1}, "n_shared_experts", id="shared_negative"),
    pytest.param({"activation": "gelu"}, "activation", id="bad_activation"),
    # NaN weights every output NaN; a NaN coefficient turns its loss off unseen
    pytest.param({"route_scale": float("nan")}, "route_scale must be finite", id="nan_scale"),
    pytest.param({"route_scale": -2.5}, "route_scale must be > 0", id="negative_scale"),
    pytest.param({"aux_loss_coef": float("nan")}, "aux_loss_coef must be finite", id="nan_aux"),
    pytest.param({"z_loss_coef": float("inf")}, "z_loss_coef must be finite", id="inf_z"),
    pytest.param({"capacity_factor": float("inf")}, "capacity_factor must be finite",
                 id="inf_capacity"),
]

# Settings of the wrong type: a string from a config file, a flag for a number.
CONFIG_TYPES = [
    pytest.param({"capacity_factor": "1.25"}, "capacity_factor must be a number", id="str"),
    pytest.param({"route_scale": True}, "route_scale must be a number", id="bool"),
]


@pytest.mark.parametrize("call, error, pattern",
                         ROUTE + PERMUTE + GROUPED_MM + KERNEL_VALUES + SWIGLU + GPT_OSS_GLU)
def test_op_rejects_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("ends", [(4, 2), (-1, 6), (3, 9)], ids=["decreasing", "negative", "past_S"])
def test_bad_offsets_rejected_on_every_backend(backend, ends, monkeypatch):
    """The reference path (DSV3_BACKEND=reference, fp64 on a GPU) slices rows by the
    offsets, where a negative end wraps and one past S clips; add_expert_bias's forward
    searches them, which assumes them sorted. Each must refuse them as the kernels do."""
    monkeypatch.setenv("DSV3_BACKEND", backend)
    x_SX, w_EXY, bias_EN = torch.randn(6, 4), torch.randn(2, 4, 5), torch.randn(2, 4)
    with pytest.raises(ValueError, match="offsets_E"):
        ops.grouped_mm(x_SX, w_EXY, offsets(*ends))
    with pytest.raises(ValueError, match="offsets_E"):
        ops.gather_grouped_mm(torch.randn(3, 4), w_EXY, offsets(*ends), row_map(3, 2))
    with torch.no_grad(), pytest.raises(ValueError, match="offsets_E"):
        ops.add_expert_bias(x_SX, bias_EN, offsets(*ends))


def test_neg_inf_logits_are_allowed():
    """-inf masks an expert out: it is never chosen while finite logits remain."""
    logits_TE = logits(10, 8)
    logits_TE[:, 0] = float("-inf")
    _, experts_TK, _ = ops.route(logits_TE, 2)
    assert (experts_TK != 0).all()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nan_logits_rejected_on_every_backend(backend, monkeypatch):
    monkeypatch.setenv("DSV3_BACKEND", backend)
    with pytest.raises(ValueError, match="logits_TE.*NaN"):
        ops.route(nan_logits(), 2)


@pytest.mark.parametrize("overrides, pattern", CONFIG)
def test_config_rejects_bad_values(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**{"dim": 8, "ffn_dim": 16, "n_experts": 8, "top_k": 2, **overrides})


@pytest.mark.parametrize("overrides, pattern", CONFIG_TYPES)
def test_config_rejects_values_of_the_wrong_type(overrides, pattern):
    with pytest.raises(TypeError, match=pattern):
        MoEConfig(**{"dim": 8, "ffn_dim": 16, "n_experts": 8, "top_k": 2, **overrides})


def test_capacity_past_every_copy_drops_nothing():
    """A capacity factor of 1e308 means "never drop"; it must not overflow."""
    for factor in (1e308, 2.0):  # 2.0 = E / K exactly: each expert can take every token
        moe = MoE(MoEConfig(dim=8, ffn_dim=16, n_experts=4, top_k=2, capacity_factor=factor))
        moe(torch.randn(6, 8))
        assert moe.last_stats.dropped_tokens.item() == 0


def small_moe():
    return MoE(MoEConfig(dim=8, ffn_dim=16, n_experts=4, top_k=2))


def test_moe_refuses_integer_x_under_autocast():
    """Autocast casts x to its dtype; token ids passed by mistake were cast silently."""
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"MoE: x\b"):
        small_moe()(torch.ones(5, 8, dtype=torch.int64))


def test_moe_on_the_meta_device_says_why_not():
    """Routing needs the values: before, autocast's device check failed deep inside."""
    moe = MoE(MoEConfig(dim=8, ffn_dim=16, n_experts=4, top_k=2), device=META)
    with pytest.raises(NotImplementedError, match=r"MoE: x on the meta device"):
        moe(torch.randn(5, 8, device=META))


@pytest.mark.parametrize("x, error", [
    pytest.param(torch.randn(5, 7), ValueError, id="wrong_last_dim"),
    pytest.param(torch.randn(0, 7), ValueError, id="empty_batch_wrong_last_dim"),
    pytest.param(torch.randn(5, 8, dtype=torch.float64), TypeError, id="dtype_ne_parameters"),
    pytest.param(torch.randn(5, 8, dtype=torch.bfloat16), TypeError, id="bf16_into_fp32_layer"),
    pytest.param(torch.ones(5, 8, dtype=torch.int64), TypeError, id="int_dtype"),
    pytest.param(torch.randn(5, 8, device=META), ValueError, id="wrong_device"),
])
def test_moe_rejects_bad_input_naming_x(x, error):
    with pytest.raises(error, match=r"MoE: x\b"):
        small_moe()(x)


def test_moe_rejects_non_tensor():
    with pytest.raises((TypeError, ValueError), match=r"MoE: x\b"):
        small_moe()([[0.0] * 8])


@pytest.mark.parametrize("config, hint", [
    (dict(dim=8, ffn_dim=16, n_experts=4), r"got dict \(build one with MoEConfig\(\*\*config\)\)"),
    (None, "got NoneType$")])
def test_moe_refuses_a_config_that_is_not_a_moe_config(config, hint):
    """A dict or None failed on config.n_experts with a bare AttributeError."""
    with pytest.raises(TypeError, match=r"MoE: config must be a dsv3.MoEConfig, " + hint):
        MoE(config)


@pytest.mark.parametrize("fn", ["moe_aux_loss", "moe_update_bias"])
def test_the_model_wide_helpers_refuse_what_is_not_a_module(fn):
    """A list of layers or None failed on .modules() with a bare AttributeError."""
    import dsv3
    helper = getattr(dsv3, fn)
    with pytest.raises(TypeError, match=fn + r": model must be a torch.nn.Module, got list "
                                        r"\(wrap a list of layers in torch.nn.ModuleList\)"):
        helper([small_moe()])
    with pytest.raises(TypeError, match=fn + r": model must be a torch.nn.Module, got NoneType"):
        helper(None)
    layers = torch.nn.ModuleList([small_moe()])
    layers[0](torch.randn(5, 8))
    helper(layers)  # the fix the message names works


def test_moe_rejects_nan_input():
    x = torch.randn(5, 8)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        small_moe()(x)


@pytest.mark.gpu
def test_mixed_devices_rejected_on_gpu():
    x_TD = torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match="experts_TK"):
        ops.permute(x_TD, experts(), 8)
    with pytest.raises(ValueError, match="w_EXY"):
        ops.grouped_mm(torch.randn(6, 4, device="cuda"), torch.randn(2, 4, 5), offsets(3, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("call", [
    pytest.param("ops.grouped_mm(torch.randn(6, 4, device='cuda'), "
                 "torch.randn(2, 4, 5, device='cuda'), offsets_E.cuda())", id="grouped_mm"),
    pytest.param("ops.unpermute(torch.randn(4, 3, device='cuda'), "
                 "torch.tensor([[0, 1], [2, 9]], dtype=torch.int32, device='cuda'))",
                 id="unpermute"),
])
def test_bad_index_values_assert_on_gpu(call):
    """On a GPU a bad offsets_E / row_map_TK is reported without a host sync, by a
    device-side assert (as PyTorch's indexing does), and nothing is accessed out of
    bounds first (that would read "illegal memory access" instead). The assert leaves
    the CUDA context unusable, so each case runs in a process of its own."""
    code = ("import torch\nfrom dsv3 import ops\n"
            "offsets_E = torch.tensor([3, 2], dtype=torch.int32)\n"
            f"{call}\ntorch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0, result.stdout
    assert "device-side assert" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gather_rejects_a_row_map_with_repeats_on_every_backend(backend, monkeypatch):
    """The reference path indexes x_TX with token_S, where a -1 would wrap around to the
    last token; the kernels would silently lose the repeated copy's token."""
    monkeypatch.setenv("DSV3_BACKEND", backend)
    with pytest.raises(ValueError, match="row_map_TK"):
        ops.gather_grouped_mm(torch.randn(2, 4), torch.randn(2, 4, 3), offsets(1, 3),
                              tokens(0, 1, 1, 2).view(2, 2))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_unpermute_rejects_a_row_map_with_repeats_on_every_backend(backend, monkeypatch):
    """Row 0 named twice and row 3 never: the backward writes each row once, so it gave
    row 0 one copy's gradient and left row 3 uninitialized memory."""
    monkeypatch.setenv("DSV3_BACKEND", backend)
    with pytest.raises(ValueError, match="row_map_TK must map every copy to a row of its own"):
        ops.unpermute(torch.randn(4, 3), tokens(0, 0, 1, 2).view(2, 2), torch.rand(2, 2))


@pytest.mark.parametrize("call", [
    pytest.param(lambda rm: torch.ops.dsv3.unpermute(torch.randn(4, 3), rm, None), id="unpermute"),
    pytest.param(lambda rm: torch.ops.dsv3.permute_rows(torch.randn(2, 3), rm), id="permute_rows"),
    pytest.param(lambda rm: torch.ops.dsv3.unpermute_backward(
        torch.randn(2, 3), torch.randn(4, 3), rm, torch.rand(2, 2)), id="unpermute_backward"),
])
def test_raw_cpu_row_map_ops_reject_repeats(call):
    """The C++ ops behind the autograd formulas scatter through the map too: each checks
    it, in the pass it makes anyway. (The Triton and CUDA kernels check ranges only, as
    a permutation check costs launches there; the public ops check the map for them.)"""
    if backend.triton_on_cpu:
        pytest.skip("DSV3_BACKEND=triton replaced the C++ kernels for this process")
    with pytest.raises(ValueError, match="row_map_TK must map every copy to a row of its own"):
        call(tokens(0, 2, 1, 2).view(2, 2))


@pytest.mark.parametrize("make, name", [
    (lambda: MoE(MoEConfig(dim=8, ffn_dim=16, n_experts=4, top_k=2), ep_group="world"),
     "MoE: ep_group"),
    (lambda: CompressionState(process_group="world"), "CompressionState: process_group"),
])
def test_a_process_group_argument_that_is_not_one_is_named(make, name):
    """A string where a ProcessGroup goes failed deep in torch ("'str' object has no
    attribute 'size'"), naming neither the argument nor what it should be."""
    with pytest.raises(TypeError, match=f"{name} must be a torch.distributed ProcessGroup"):
        make()


@pytest.mark.parametrize("state", [{"block": 256}, {"block_size": 256, "iteration": 3}, [1, 2]])
def test_compression_state_refuses_what_is_not_its_state_dict(state):
    """A model's state_dict passed by mistake was a bare KeyError: 'block_size'."""
    with pytest.raises(ValueError, match=r"CompressionState.load_state_dict: expected a dict "
                                         r"from CompressionState.state_dict\(\) with keys "):
        CompressionState().load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.int32, "bfloat16", torch.bool])
def test_a_layer_dtype_that_cannot_train_is_named(dtype):
    """Before: "Only Tensors of floating point and complex dtype can require gradients"
    from deep in nn.Parameter (a string passed as far as torch.empty)."""
    with pytest.raises(TypeError, match=r"MoE: dtype must be a floating-point torch.dtype"):
        MoE(MoEConfig(dim=8, ffn_dim=16, n_experts=4, top_k=2), dtype=dtype)
