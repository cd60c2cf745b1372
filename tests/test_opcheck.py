"""torch.library registration of every dsv3:: op, checked by torch.library.opcheck:
schema, fake (meta) implementation against the real one, autograd registration and
AOT dispatch (what torch.compile relies on)."""
import pytest
import torch

from conftest import make_experts
from dsv3 import ops


def _token_index(row_map_TK):
    token_S = torch.empty(row_map_TK.numel(), dtype=torch.int32)
    token_S[row_map_TK.flatten().long()] = torch.arange(row_map_TK.shape[0],
                                                        dtype=torch.int32).repeat_interleave(
                                                            row_map_TK.shape[1])
    return token_S


def op_cases():
    torch.manual_seed(0)  # built at collection time, before the seed fixture runs
    logits_TE = torch.randn(9, 8, requires_grad=True)
    experts_TK = make_experts(9, 4, 2, "dropped")
    offsets_E, row_map_TK = ops.expert_index(experts_TK, 4)
    y_SD = torch.randn(18, 5, requires_grad=True)
    weights_TK = torch.rand(9, 2, requires_grad=True)
    d = torch.ops.dsv3
    return [
        # softmax routing, normalized
        pytest.param(d.route.default, (logits_TE, 2, "softmax", None, 1, 1, True, 1.0, False),
                     id="route_softmax"),
        # sigmoid + bias + groups + scale
        pytest.param(d.route.default,
                     (logits_TE, 3, "sigmoid", torch.randn(8), 4, 2, True, 2.5, False),
                     id="route_deepseek"),
        # with the balance-loss sums (differentiable outputs 3 and 4)
        pytest.param(d.route.default, (logits_TE, 2, "softmax", None, 1, 1, True, 1.0, True),
                     id="route_softmax_stats"),
        pytest.param(d.route.default,
                     (logits_TE, 3, "sigmoid", torch.randn(8), 4, 2, True, 2.5, True),
                     id="route_deepseek_stats"),
        # counting sort with dropped copies
        pytest.param(d.expert_index.default, (experts_TK, 4), id="expert_index"),
        pytest.param(d.permute_rows.default, (torch.randn(9, 5, requires_grad=True), row_map_TK),
                     id="permute_rows"),
        pytest.param(d.unpermute.default, (y_SD, row_map_TK, weights_TK), id="unpermute_weighted"),
        pytest.param(d.unpermute.default, (y_SD, row_map_TK, None), id="unpermute_plain"),
        # contiguous [E, X, Y] weights
        pytest.param(d.grouped_mm.default,
                     (y_SD, torch.randn(4, 5, 7, requires_grad=True), offsets_E),
                     id="grouped_mm"),
        # nn.Linear layout passed transposed
        pytest.param(d.grouped_mm.default,
                     (y_SD, torch.randn(4, 7, 5).transpose(1, 2).requires_grad_(), offsets_E),
                     id="grouped_mm_linear_layout"),
        # the permute fused into the GEMM's loads (token_S: row_map_TK inverted)
        pytest.param(d.grouped_mm_gather.default,
                     (torch.randn(9, 5, requires_grad=True),
                      torch.randn(4, 7, 5).transpose(1, 2).requires_grad_(), offsets_E,
                      _token_index(row_map_TK), row_map_TK),
                     id="grouped_mm_gather"),
        pytest.param(d.swiglu.default, (torch.randn(18, 8, requires_grad=True),), id="swiglu"),
        # GPT-OSS's interleaved gate/up, unclamped and with its swiglu_limit
        pytest.param(d.gpt_oss_glu.default, (torch.randn(18, 8, requires_grad=True), 1.702),
                     id="gpt_oss_glu"),
        pytest.param(d.gpt_oss_glu.default,
                     (3 * torch.randn(18, 8, requires_grad=True), 1.702, 2.0),
                     id="gpt_oss_glu_clamped"),
        # biased experts' CPU kernels (their autograd is ops.add_expert_bias's Function)
        pytest.param(d.add_expert_bias.default, (y_SD.detach(), torch.randn(4, 5), offsets_E),
                     id="add_expert_bias"),
        pytest.param(d.expert_row_sums.default, (torch.randn(18, 5), offsets_E),
                     id="expert_row_sums"),
    ]


@pytest.mark.parametrize("op, args", op_cases())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values, strides (1, rows): what a transposed activation looks like."""
    return t.t().contiguous().t()


def strided_cases():
    """Ops whose fakes built their output like an input (empty_like keeps its strides)
    while every kernel returns a contiguous tensor: a compiled graph saw wrong strides
    for a column-major input, and torch.compile's backward failed."""
    torch.manual_seed(0)
    experts_TK = make_experts(6, 4, 2)
    _, row_map_TK = ops.expert_index(experts_TK, 4)
    h_S2F, grad_a_SF = torch.randn(12, 8), torch.randn(12, 4)
    d = torch.ops.dsv3
    return [
        pytest.param(d.expert_index.default, (_column_major(experts_TK), 4), id="expert_index"),
        pytest.param(d.unpermute_backward.default,
                     (torch.randn(6, 5), _column_major(torch.randn(12, 5)), row_map_TK,
                      _column_major(torch.rand(6, 2))), id="unpermute_backward"),
        pytest.param(d.swiglu_backward.default, (grad_a_SF, _column_major(h_S2F)),
                     id="swiglu_backward"),
        pytest.param(d.gpt_oss_glu_backward.default, (grad_a_SF, _column_major(h_S2F), 1.702),
                     id="gpt_oss_glu_backward"),
        pytest.param(d.add_expert_bias.default,
                     (_column_major(torch.randn(12, 5)), _column_major(torch.randn(4, 5)),
                      ops.expert_index(experts_TK, 4)[0]), id="add_expert_bias"),
    ]


@pytest.mark.parametrize("op, args", strided_cases())
def test_fake_strides_match_the_kernels_for_strided_inputs(op, args):
    torch.library.opcheck(op, args, test_utils=("test_faketensor",))
