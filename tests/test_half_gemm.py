"""bf16/fp16 GEMMs on the CPU through fp32 copies (csrc/cpu/half_gemm.h): both
paths of DSV3_CPU_HALF_GEMM, whatever this machine's own choice, give the reference's
outputs and gradients (grouped GEMM, gathered, weight gradient, the router's
backward, the shared experts' HalfLinear); the path asked for is the one that runs;
a bad value is refused by name."""
import pytest
import torch
import torch.nn.functional as F

from conftest import check_op, make_experts
from dsv3 import ops, reference
from dsv3.ops.linear import HalfLinear, half_linear, router_logits

HALF = [torch.bfloat16, torch.float16]
MODES = ["fp32", "native"]


@pytest.fixture
def half_gemm(monkeypatch):
    def choose(mode: str) -> None:
        monkeypatch.setenv("DSV3_CPU_HALF_GEMM", mode)
    return choose


def mm_input_dtypes(run) -> set:
    """The dtypes of the aten::mm calls ``run()`` made, the kernels' own included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as profile:
        run()
    return {tuple(event.input_dtypes[:2]) for event in profile.events()
            if event.name == "aten::mm"}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
def test_the_mode_decides(mode, dtype, half_gemm):
    half_gemm(mode)
    assert torch.ops.dsv3.cpu_half_gemm_in_fp32(dtype) is (mode == "fp32")
    assert torch.ops.dsv3.cpu_half_gemm_in_fp32(torch.float32) is False


def test_auto_follows_torchs_native_support(half_gemm):
    half_gemm("auto")
    native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported()}
    for dtype in HALF:
        assert torch.ops.dsv3.cpu_half_gemm_in_fp32(dtype) is (not native[dtype])


def test_a_bad_mode_is_named(half_gemm):
    half_gemm("fast")
    x_SX, w_EXY = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, 3).bfloat16()
    with pytest.raises(ValueError, match="DSV3_CPU_HALF_GEMM must be auto, fp32 or native"):
        ops.grouped_mm(x_SX, w_EXY, torch.tensor([2, 4], dtype=torch.int32))


# (T, E, K, X, Y): segments averaging over 1024 rows run one after another with
# multithreaded BLAS; smaller ones side by side, one per thread.
SHAPES = [pytest.param(40, 6, 2, 24, 40, id="small_segments"),
          pytest.param(2100, 4, 2, 16, 8, id="large_segments")]


@pytest.mark.parametrize("T, E, K, X, Y", SHAPES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
def test_grouped_gemms_match_reference(T, E, K, X, Y, mode, dtype, half_gemm):
    half_gemm(mode)
    experts_TK = make_experts(T, E, K, "empty")  # empty experts: exact zero gradients
    offsets_E, row_map_TK = ops.expert_index(experts_TK, E)
    x_TX = torch.randn(T, X).to(dtype)
    w_EXY = (torch.randn(E, Y, X) / X**0.5).to(dtype).transpose(1, 2)  # the layer's layout
    x_SX = reference.permute(x_TX, experts_TK, E)[0]
    (_,), (_, grad_w_EXY) = check_op(
        lambda x, w: ops.grouped_mm(x, w, offsets_E),
        lambda x, w: reference.grouped_mm(x, w, offsets_E), [x_SX, w_EXY], differentiable=(0, 1))
    empty_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)) == 0
    assert empty_E.any() and (grad_w_EXY[empty_E] == 0).all()
    check_op(lambda x, w: ops.gather_grouped_mm(x, w, offsets_E, row_map_TK),
             lambda x, w: reference.grouped_mm(reference.permute(x, experts_TK, E)[0], w,
                                               offsets_E),
             [x_TX, w_EXY], differentiable=(0, 1))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
def test_the_kernels_multiply_in_the_dtype_asked_for(mode, dtype, half_gemm):
    """Forward, d(x) and d(w) of the gathered grouped GEMM: every BLAS call on fp32
    copies, or every one on the half-precision tensors themselves."""
    half_gemm(mode)
    T, E, X, Y = 64, 4, 16, 24  # 16 rows a segment on average: BLAS, not small_rows
    offsets_E, row_map_TK = ops.expert_index(make_experts(T, E, 1), E)
    x_TX = torch.randn(T, X).to(dtype).requires_grad_()
    w_EXY = torch.randn(E, X, Y).to(dtype).requires_grad_()

    def step():
        ops.gather_grouped_mm(x_TX, w_EXY, offsets_E, row_map_TK).sum().backward()
    want = gemm_dtype_name(mode, dtype)
    assert mm_input_dtypes(step) == {(want, want)}


def gemm_dtype_name(mode: str, dtype: torch.dtype) -> str:
    """How the profiler names the dtype the GEMMs should run in."""
    if mode == "fp32":
        return "float"
    return {torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}[dtype]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
def test_router_backward_in_either_mode(mode, dtype, half_gemm):
    """The gradients of fp32 logits from half-precision x and weight: against fp64,
    within twice plain torch's error in that dtype (check_op's tolerance); the GEMMs
    in the dtype the mode asks for."""
    half_gemm(mode)
    x_TD, weight_ED = torch.randn(50, 32).to(dtype), (torch.randn(8, 32) / 32**0.5).to(dtype)
    check_op(lambda x, w: router_logits(x, w, torch.float32).to(dtype),
             lambda x, w: (x @ w.t()).to(dtype), [x_TD, weight_ED], differentiable=(0, 1))
    x_TD.requires_grad_()
    weight_ED.requires_grad_()

    def backward():
        router_logits(x_TD, weight_ED, torch.float32).sum().backward()
    want = gemm_dtype_name(mode, dtype)
    # the forward's fp32 GEMM, then the backward's two
    assert mm_input_dtypes(backward) == {("float", "float"), (want, want)}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", MODES)
def test_half_linear_matches_f_linear_in_either_mode(mode, dtype, half_gemm):
    """The shared experts' projections: against fp64, within twice plain torch's error
    in that dtype; every GEMM, forward and backward, in the dtype the mode asks for."""
    half_gemm(mode)
    x_TD, weight_OD = torch.randn(40, 24).to(dtype), (torch.randn(36, 24) / 24**0.5).to(dtype)
    check_op(half_linear, F.linear, [x_TD, weight_OD], differentiable=(0, 1))
    layer = HalfLinear(24, 36, bias=False, dtype=dtype)
    x_BTD = torch.randn(2, 5, 24).to(dtype).requires_grad_()

    def step():
        y_BTO = layer(x_BTD)
        assert y_BTO.shape == (2, 5, 36) and y_BTO.dtype == dtype
        y_BTO.sum().backward()
    want = gemm_dtype_name(mode, dtype)
    assert mm_input_dtypes(step) == {(want, want)}
    assert x_BTD.grad.dtype == layer.weight.grad.dtype == dtype


def test_half_linear_under_autocast_rounds_the_fp32_weight_as_autocast_does(half_gemm):
    """An fp32 master weight under bf16 autocast: bf16 out, an fp32 gradient for the
    weight, both close to what F.linear under autocast gives."""
    half_gemm("fp32")
    x_TD = torch.randn(30, 16).bfloat16().requires_grad_()
    weight_OD = torch.randn(12, 16, requires_grad=True)
    g_TO = torch.randn(30, 12).bfloat16()
    results = []
    for linear in (half_linear, F.linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_TO = linear(x_TD, weight_OD)
        results.append((y_TO, *torch.autograd.grad(y_TO, (x_TD, weight_OD), g_TO)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert results[0][2].dtype == torch.float32


def test_a_biased_half_linear_is_nn_linear(half_gemm):
    half_gemm("fp32")
    layer = HalfLinear(8, 4, dtype=torch.bfloat16)
    x_TD = torch.randn(3, 8).bfloat16()
    assert torch.equal(layer(x_TD), F.linear(x_TD, layer.weight, layer.bias))


@pytest.mark.parametrize("autocast_dtype, dtype", [(torch.bfloat16, torch.float16),
                                                   (torch.float16, torch.bfloat16)])
def test_the_kernels_ignore_the_callers_autocast(autocast_dtype, dtype, half_gemm):
    """The kernels choose their GEMMs' dtypes: an autocast around the op cast the fp32
    copies back to the autocast dtype (fp16 at bf16 precision, large bf16 values to
    fp16's inf)."""
    half_gemm("fp32")
    scale = 1e3 if dtype == torch.bfloat16 else 1.0  # products past fp16's range, in bf16
    x_SX = (torch.randn(64, 32) * scale).to(dtype)
    w_EXY = (torch.randn(2, 32, 16) * scale).to(dtype)
    offsets_E = torch.tensor([40, 64], dtype=torch.int32)
    want = ops.grouped_mm(x_SX, w_EXY, offsets_E)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = ops.grouped_mm(x_SX, w_EXY, offsets_E)
    assert torch.isfinite(got).all() and torch.equal(got, want)
