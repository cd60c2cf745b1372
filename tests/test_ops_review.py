"""Regression tests from an adversarial review of the op API and dsv3.MoE: uses of
autograd the ops do not support must fail loudly (double backward, forward-mode AD)
rather than return wrong derivatives; bad routing arguments and out-of-range row maps
are named; a layer deep-copies mid-training; and every op matches the reference
on strided inputs and on the upstream gradients ``.sum()``/``expand``/a transpose give."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from conftest import DEVICES, assert_close, make_experts
from dsv3 import MoE, MoEConfig, ops, reference

F64 = torch.float64


def _routing(n_tokens=7, n_experts=4, top_k=2, device="cpu"):
    experts_TK = make_experts(n_tokens, n_experts, top_k, "random").to(device)
    offsets_E, row_map_TK = ops.expert_index(experts_TK, n_experts)
    return experts_TK, offsets_E, row_map_TK


def _op_calls(routing=None):
    """(name, fn of differentiable fp64 inputs, those inputs) for every differentiable op."""
    experts_TK, offsets_E, row_map_TK = routing or _routing()
    T, E, K, D, F = 7, 4, 2, 5, 3
    return {
        "grouped_mm": (lambda x, w: ops.grouped_mm(x, w, offsets_E),
                       [torch.randn(T * K, D, dtype=F64), torch.randn(E, D, F, dtype=F64)]),
        "grouped_mm_linear_layout": (
            lambda x, w: ops.grouped_mm(x, w.transpose(1, 2), offsets_E),
            [torch.randn(T * K, D, dtype=F64), torch.randn(E, F, D, dtype=F64)]),
        "gather_grouped_mm": (lambda x, w: ops.gather_grouped_mm(x, w, offsets_E, row_map_TK),
                              [torch.randn(T, D, dtype=F64), torch.randn(E, D, F, dtype=F64)]),
        "swiglu": (ops.swiglu, [torch.randn(T, 2 * F, dtype=F64)]),
        "gpt_oss_glu": (lambda h: ops.gpt_oss_glu(h, 1.702, 2.0),
                        [torch.randn(T, 2 * F, dtype=F64)]),
        "unpermute": (lambda y, w: ops.unpermute(y, row_map_TK, w),
                      [torch.randn(T * K, D, dtype=F64), torch.rand(T, K, dtype=F64)]),
        "route": (lambda logits: ops.route(logits, K).weights_TK, [torch.randn(T, E, dtype=F64)]),
        "route_with_stats": (lambda logits: ops.route_with_stats(logits, K, "sigmoid").score_sum_E,
                             [torch.randn(T, E, dtype=F64)]),
    }


@pytest.mark.parametrize("name", list(_op_calls()))
def test_double_backward_is_a_clear_error(name):
    # Before: the backward kernels had no autograd formula, torch's fallback built a
    # graph through them with create_graph=True, and the second derivative came out
    # silently wrong (gradgradcheck: Jacobian mismatch), with only a deprecation warning.
    fn, inputs = _op_calls()[name]
    # fp32: the kernels' path (fp64 takes the differentiable reference path on Triton).
    inputs = [t.float().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(fn(*inputs).square().sum(), inputs, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(NotImplementedError, match="double backward"):
        penalty.backward()


@pytest.mark.parametrize("name", ["permute", "unpermute_unweighted"])
def test_double_backward_stays_correct_where_the_backward_is_a_differentiable_op(name):
    # The refusal is per backward kernel: ops whose backward is another dsv3 op with
    # its own formula (permute <-> unweighted unpermute) keep exact second derivatives.
    experts_TK, _, row_map_TK = _routing()
    if name == "permute":
        fn, x = (lambda x: ops.permute(x, experts_TK, 4).x_SD), torch.randn(7, 5, dtype=F64)
    else:
        fn, x = (lambda y: ops.unpermute(y, row_map_TK, None)), torch.randn(14, 5, dtype=F64)
    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_op_calls()))
def test_float64_gradients_are_float64_exact(name, device):
    # Before: on a GPU (and under DSV3_BACKEND=triton) fp64 went to the Triton kernels,
    # which accumulate in fp32, and gradcheck failed. Here fp64 takes the exact path
    # wherever Triton would run (the C++ CPU kernels compute in fp64).
    fn, inputs = _op_calls(_routing(device=device))[name]
    inputs = [t.to(device).requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", list(_op_calls()))
def test_forward_mode_ad_is_a_clear_error(name):
    # Before: torch.library dropped the tangent of a dual input (it only checks
    # requires_grad), so torch.func.jvp returned an all-zero tangent without a word.
    fn, inputs = _op_calls()[name]
    tangents = tuple(torch.randn_like(t) for t in inputs)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(fn, tuple(inputs), tangents)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        fn(*[fwAD.make_dual(t, dt) for t, dt in zip(inputs, tangents)])


@pytest.mark.parametrize("name", list(_op_calls()))
def test_torch_func_grad_fails_loudly(name):
    """torch refuses its differentiating transforms for ops whose formula comes through
    torch.library.register_autograd (pytorch/pytorch#168393), as the README says: an
    error, never a silent wrong gradient. When torch lifts that, this test fails and
    the README sentence goes."""
    fn, inputs = _op_calls()[name]
    inputs = [t.float() for t in inputs]  # fp64 may take the torch path (DSV3_BACKEND=triton)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda *xs: fn(*xs).sum())(*inputs)


@pytest.mark.parametrize("name", list(_op_calls()))
def test_vmap_matches_a_loop(name):
    """vmap without differentiation runs the op's kernel once per batch entry: the same
    values. (fp32: fp64 may take the torch path, whose checks vmap cannot batch.)"""
    fn, inputs = _op_calls()[name]
    batched = [torch.stack([t, t.flip(0)]).float() for t in inputs]
    got = torch.func.vmap(fn)(*batched)
    want = torch.stack([fn(*[b[i] for b in batched]) for i in range(2)])
    assert torch.equal(got, want)


def test_forward_ad_level_without_dual_inputs_still_runs():
    # A forward-AD level open for another part of a model does not stop the ops.
    h_S2F = torch.randn(7, 6)
    with fwAD.dual_level():
        assert_close(ops.swiglu(h_S2F), reference.swiglu(h_S2F))


def test_moe_under_jvp_is_a_clear_error():
    moe = MoE(MoEConfig(dim=8, ffn_dim=6, n_experts=4, top_k=2))
    x = torch.randn(5, 8)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(moe, (x,), (torch.randn_like(x),))


@pytest.mark.parametrize("kwargs, error, pattern", [
    # Before: float("2") made a string scale 2.0 silently.
    ({"scale": "2"}, TypeError, "route: scale must be a number, got str"),
    # Before: a NaN scale gave NaN weights.
    ({"scale": float("nan")}, ValueError, "route: scale must be finite"),
    ({"scale": torch.tensor(2.0)}, TypeError, "route: scale must be a number, got Tensor"),
    # Before: accepted, every weight inf (the weights are fp32 for fp32/fp16/bf16 logits).
    ({"scale": 1e39}, ValueError, r"route: scale 1e\+39 is past the range of the torch.float32"),
    ({"scale": -10 ** 40}, ValueError, "route: scale -10+ is past the range"),
    # Before: on the reference backend any truthy value normalized.
    ({"normalize": "no"}, TypeError, "route: normalize must be True or False, got 'no'"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_route_rejects_bad_scale_and_normalize(kwargs, error, pattern, backend, monkeypatch):
    monkeypatch.setenv("DSV3_BACKEND", backend)
    with pytest.raises(error, match=pattern):
        ops.route(torch.randn(4, 8), 2, **kwargs)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_route_takes_a_scale_past_fp32_for_fp64_logits(backend, monkeypatch):
    # fp64 logits give fp64 weights, which hold a scale no fp32 weight could.
    monkeypatch.setenv("DSV3_BACKEND", backend)
    weights_TK = ops.route(torch.randn(4, 8, dtype=torch.float64), 2, scale=1e39)[0]
    assert weights_TK.dtype == torch.float64 and torch.isfinite(weights_TK).all()
    assert_close(weights_TK.sum(-1), torch.full((4,), 1e39, dtype=torch.float64))


@pytest.mark.parametrize("bad", ["past_the_end", "negative_wrapping_onto_a_free_row"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gather_rejects_out_of_range_row_map_naming_it(bad, backend, monkeypatch):
    monkeypatch.setenv("DSV3_BACKEND", backend)
    _, offsets_E, row_map_TK = _routing()
    row_map_TK = row_map_TK.clone()
    last = row_map_TK.numel() - 1
    if bad == "past_the_end":  # before: an IndexError that named no argument
        row_map_TK[row_map_TK == last] = last + 5
    else:  # before: -1 wrapped onto row T*K-1, which no other copy held: accepted
        row_map_TK[row_map_TK == last] = -1
    with pytest.raises(ValueError, match=r"gather_grouped_mm: row_map_TK values must be in"):
        ops.gather_grouped_mm(torch.randn(7, 5), torch.randn(4, 5, 3), offsets_E, row_map_TK)


def test_moe_deep_copies_after_a_training_forward():
    # Before: aux_loss (a non-leaf tensor of the last forward's graph) made
    # copy.deepcopy(model) fail mid-training ("Only Tensors created explicitly by the
    # user ... support the deepcopy protocol"), e.g. for an EMA or teacher copy.
    moe = MoE(MoEConfig(dim=8, ffn_dim=6, n_experts=4, top_k=2, bias_update_rate=1e-3))
    x = torch.randn(5, 8)
    moe(x).sum().backward()
    assert moe.aux_loss.requires_grad
    twin = copy.deepcopy(moe)
    assert moe.aux_loss.grad_fn is not None  # the original keeps its graph
    assert not twin.aux_loss.requires_grad and torch.equal(twin.aux_loss, moe.aux_loss.detach())
    assert torch.equal(twin.expert_bias, moe.expert_bias)
    moe.eval(), twin.eval()
    assert torch.equal(twin(x), moe(x))


def _bias_config():
    return MoEConfig(dim=8, ffn_dim=6, n_experts=4, top_k=2, bias_update_rate=1e-3)


def test_meta_init_then_assign_load_keeps_the_bias_fp32_and_the_counts_usable():
    # Before: load_state_dict(assign=True) took a bf16-stored bias as is (its 1e-3
    # steps vanish in bf16, what _apply guards against for .to()), and left the
    # never-saved pending_counts on the meta device, so the first training forward failed.
    src = MoE(_bias_config())
    src.expert_bias += 0.3
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in src.state_dict().items()}
    with torch.device("meta"):
        moe = MoE(_bias_config())
    moe.load_state_dict(state, assign=True)
    assert moe.expert_bias.dtype == torch.float32
    assert torch.equal(moe.expert_bias, src.expert_bias.to(torch.bfloat16).float())
    assert moe.pending_counts.device.type == "cpu" and not moe.pending_counts.any()
    moe.float()(torch.randn(5, 8))  # training forward: counts added
    assert moe.pending_counts.sum().item() == 5 * 2


def test_reset_parameters_after_to_empty_zeroes_the_balancing_state():
    # Before: to_empty() (meta-device init) left pending_counts and expert_bias as
    # uninitialized memory, and reset_parameters() did not touch them: the first
    # update_bias() moved the bias by garbage counts.
    with torch.device("meta"):
        moe = MoE(_bias_config())
    moe.to_empty(device="cpu")
    moe.pending_counts.fill_(123)
    moe.expert_bias.fill_(7.0)
    moe.reset_parameters()
    assert not moe.pending_counts.any() and not moe.expert_bias.any()


def test_to_empty_then_load_state_dict_starts_the_counts_at_zero():
    # Before: the counts (never saved) kept to_empty()'s uninitialized memory through an
    # ordinary load, and the first update_bias() moved the bias by them.
    state = MoE(_bias_config()).state_dict()
    with torch.device("meta"):
        moe = MoE(_bias_config())
    moe.to_empty(device="cpu")
    moe.pending_counts.fill_(123)  # what uninitialized memory may hold
    moe.load_state_dict(state)
    assert not moe.pending_counts.any()


def test_config_rejects_a_normalize_weights_that_is_not_a_bool():
    # Before: accepted, and route's own check failed at the first forward.
    with pytest.raises(TypeError, match="MoEConfig: normalize_weights must be True or False, "
                                        "got 1"):
        MoEConfig(dim=8, ffn_dim=6, n_experts=4, top_k=2, normalize_weights=1)


# --- strided inputs and upstream gradients -------------------------------------------------------
def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The values of ``t`` in another memory layout."""
    if how == "slice":  # every other element of a bigger buffer, at an offset
        big = torch.zeros(t.shape[0] + 3, *(2 * s for s in t.shape[1:]), dtype=t.dtype)
        every_other = tuple(slice(0, 2 * s, 2) for s in t.shape[1:])
        view = big[2:2 + t.shape[0]][(slice(None), *every_other)]
        return view.copy_(t)
    if how == "transposed":  # column-major storage
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t.clone()


def _upstream(out: torch.Tensor, how: str) -> torch.Tensor:
    if how == "expanded":  # what .sum() or a broadcast hands back: stride 0
        return torch.randn(1, *out.shape[1:], dtype=out.dtype).expand_as(out)
    if how == "transposed":
        return torch.randn(out.shape[::-1], dtype=out.dtype).t()
    return torch.randn_like(out)


@pytest.mark.parametrize("grad_layout", ["contiguous", "expanded", "transposed"])
@pytest.mark.parametrize("layout", ["contiguous", "slice", "transposed"])
@pytest.mark.parametrize("name", list(_op_calls()))
def test_ops_match_reference_on_strided_inputs_and_gradients(name, layout, grad_layout):
    routing = experts_TK, offsets_E, row_map_TK = _routing()
    refs = {
        "grouped_mm": lambda x, w: reference.grouped_mm(x, w, offsets_E),
        "grouped_mm_linear_layout": lambda x, w: reference.grouped_mm(x, w.transpose(1, 2),
                                                                      offsets_E),
        "gather_grouped_mm": lambda x, w: reference.grouped_mm(
            reference.permute(x, experts_TK, 4)[0], w, offsets_E),
        "swiglu": reference.swiglu,
        "gpt_oss_glu": lambda h: reference.gpt_oss_glu(h, 1.702, 2.0),
        "unpermute": lambda y, w: reference.unpermute(y, row_map_TK, w),
        "route": lambda logits: reference.route(logits, 2)[0],
        "route_with_stats": lambda logits: reference.route_stats(logits, "sigmoid")[0],
    }
    fn, inputs = _op_calls(routing)[name]
    inputs = [t.float() for t in inputs]
    ours = [_strided(t, layout).requires_grad_() for t in inputs]
    theirs = [t.clone().requires_grad_() for t in inputs]
    out, want = fn(*ours), refs[name](*theirs)
    grad = _upstream(out, grad_layout)
    out.backward(grad)
    want.backward(grad)
    assert_close(out, want)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.grad, b.grad, f"grad of input {i}")
