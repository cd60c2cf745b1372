"""Shared test machinery: seeding, the one tolerance table, the reference
comparison helper every op test uses, input generators and the ``gpu`` marker.

Tolerances: fp32/fp64 outputs must match the reference to a
relative tolerance; for fp16/bf16 the kernel is compared with an fp64 run of the
reference and may be at most 2x as wrong as plain PyTorch in the same low
precision, plus a small floor (so an exactly-right plain result does not demand
an exactly-right kernel).
"""
import os

import pytest
import torch

# --- tolerance table, by dtype ---------------------------------------------------------------
# fp32/fp64: torch.testing.assert_close rtol, and atol as a fraction of the reference's
# largest magnitude, at least 1 (elementwise relative error is meaningless where values
# cancel, and test inputs are O(1), so a gradient that is mathematically zero is noise).
# fp16/bf16: ratio to plain PyTorch's error, floor as a fraction of that magnitude.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"ratio": 2.0, "floor": 2e-3},
    torch.float16: {"ratio": 2.0, "floor": 2.5e-4},
}
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Set by `make test`'s second pass, which runs the op and layer tests through the Triton
# kernels on CPU tensors (DSV3_BACKEND=triton under TRITON_INTERPRET=1).
TRITON_INTERPRETED = (os.environ.get("TRITON_INTERPRET") == "1"
                      and os.environ.get("DSV3_BACKEND") == "triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    # Patch triton.language once per launch, not on every helper's call (a third of
    # the interpreter pass's time; tests/interpreter_patching.py says why it is safe).
    from interpreter_patching import install as _install_interpreter_patching
    _install_interpreter_patching()

# Dtypes every op and the layer are tested in (fp64: the gradchecks). The Triton
# interpreter computes bf16 wrongly (tl.dot garbage, truncating casts), so
# its pass covers fp32/fp16 and bf16 Triton runs are left to the GPU tests.
DTYPES = ([torch.float32, torch.float16] if TRITON_INTERPRETED
          else [torch.float32, torch.bfloat16, torch.float16])

# Devices the op tests run on; CUDA ones are collected everywhere, skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_runtest_logreport(report):
    """With DSV3_FAILURE_LOG set, each failure's report is appended there as it
    happens: benchmarks/gpu_check.sh stops pytest at its time limit, and a stopped
    pytest prints no summary. Under xdist the controller writes them all (a crashed
    worker's too); the workers, which run this hook as well, write nothing."""
    path = os.environ.get("DSV3_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} [{report.when}]\n{report.longreprtext[-4000:]}\n")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state, so a failure reproduces alone."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    """Op tests compare the kernels with the reference: make sure a DSV3_BACKEND
    left in the environment does not silently turn that into reference vs reference."""
    monkeypatch.delenv("DSV3_BACKEND", raising=False)


# --- comparisons -------------------------------------------------------------------------------
def _scale(ref: torch.Tensor) -> float:
    return max(ref.detach().abs().max().item(), 1e-30) if ref.numel() else 1.0


def assert_finite(t: torch.Tensor, what: str = "output") -> None:
    assert torch.isfinite(t).all(), f"{what} has non-finite values (an unwritten row?)"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """fp32/fp64 comparison from the tolerance table; integers must be equal."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not actual.is_floating_point():
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual.cpu(), expected.cpu()), f"{what} differs"
        return
    tol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"],
                               atol=tol["atol"] * max(_scale(expected), 1.0),
                               msg=lambda m: f"{what}: {m}")


def assert_close_to_reference(kernel_out: torch.Tensor, ref_fp64: torch.Tensor,
                              plain_lowp_out: torch.Tensor, what: str = "output",
                              dtype: torch.dtype | None = None) -> None:
    """fp16/bf16: max|kernel - ref| <= ratio * max|plain - ref| + floor * max|ref|.

    ``dtype`` is the precision under test (default: plain_lowp_out's dtype); give it
    for outputs kept in fp32 by design, such as routing weights from bf16 logits."""
    assert kernel_out.shape == ref_fp64.shape == plain_lowp_out.shape, what
    assert_finite(kernel_out, what)
    ref = ref_fp64.double().cpu()
    tol = TOLERANCES[dtype or plain_lowp_out.dtype]
    err_kernel = (kernel_out.double().cpu() - ref).abs().max().item()
    err_plain = (plain_lowp_out.double().cpu() - ref).abs().max().item()
    bound = tol["ratio"] * err_plain + tol["floor"] * _scale(ref)
    assert err_kernel <= bound, (f"{what}: kernel error {err_kernel:.3g} > {tol['ratio']} x plain "
                                 f"error {err_plain:.3g} + floor (bound {bound:.3g})")


# --- forward + backward runner --------------------------------------------------------------
def forward_backward(fn, inputs, differentiable=(), grad_dtype=torch.float32, grad_seed=1):
    """Runs ``fn(*inputs)`` with the inputs at indices ``differentiable`` requiring grad and
    back-propagates a seeded random upstream gradient into every floating output. The
    upstream gradient is rounded to ``grad_dtype`` first, so runs in different precisions
    see the same values. Returns (outputs, grads of the differentiable inputs)."""
    inputs = [t.detach().clone().requires_grad_(i in differentiable) if isinstance(t, torch.Tensor)
              else t for i, t in enumerate(inputs)]
    outs = fn(*inputs)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if not differentiable:
        return [o.detach() for o in outs], []
    gen = torch.Generator().manual_seed(grad_seed)
    float_outs, grad_outs = [], []
    for o in outs:
        if o.is_floating_point():
            g = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(grad_dtype)
            if o.requires_grad:
                float_outs.append(o)
                grad_outs.append(g.to(device=o.device, dtype=o.dtype))
    grads = torch.autograd.grad(float_outs, [inputs[i] for i in differentiable], grad_outs,
                                allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def _upcast(inputs):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs]


def check_op(op, ref_op, inputs, differentiable=()):
    """Compares ``op`` with ``ref_op`` on ``inputs``: every output, and the grads of the
    inputs at indices ``differentiable`` for one random upstream gradient. The precision
    is the dtype of the first floating input: fp32/fp64 against the reference in the same
    dtype, fp16/bf16 against an fp64 reference relative to plain PyTorch's error.
    Returns the op's (outputs, grads)."""
    dtype = next(t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    outs, grads = forward_backward(op, inputs, differentiable, dtype)
    for i, o in enumerate(outs):
        if o.is_floating_point():
            assert_finite(o, f"output {i}")
    for i, g in zip(differentiable, grads):
        assert g is not None, f"no gradient for input {i}"
        assert_finite(g, f"grad of input {i}")

    if dtype in LOW_PRECISION:
        ref_outs, ref_grads = forward_backward(ref_op, _upcast(inputs), differentiable, dtype)
        plain_outs, plain_grads = forward_backward(ref_op, inputs, differentiable, dtype)
        for i, (o, r, p) in enumerate(zip(outs, ref_outs, plain_outs, strict=True)):
            if o.is_floating_point():
                assert_close_to_reference(o, r, p, f"output {i}", dtype)
            else:
                assert_close(o, r, f"output {i}")
        for i, g, r, p in zip(differentiable, grads, ref_grads, plain_grads, strict=True):
            assert_close_to_reference(g, r, p, f"grad of input {i}", dtype)
    else:
        ref_outs, ref_grads = forward_backward(ref_op, inputs, differentiable, dtype)
        for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
            assert_close(o, r, f"output {i}")
        for i, g, r in zip(differentiable, grads, ref_grads, strict=True):
            assert_close(g, r, f"grad of input {i}")
    return outs, grads


# --- input generators -------------------------------------------------------------------------
def make_experts(n_tokens: int, n_experts: int, top_k: int, pattern: str = "random",
                 device="cpu") -> torch.Tensor:
    """int32 [T, K] expert ids, distinct within a token.

    random: uniform; one_expert: every token picks the same K experts (the others
    stay empty); empty: only odd experts are used (expert 0, and the last one when E
    is odd, get nothing); dropped: random with about a quarter of the copies -1.
    """
    if pattern == "one_expert":
        hot = torch.arange(top_k) + (n_experts - top_k) // 2
        experts_TK = hot.expand(n_tokens, top_k)
    elif pattern == "empty":
        odd = torch.arange(1, n_experts, 2)
        assert top_k <= odd.numel(), "pattern 'empty' needs top_k <= E // 2"
        experts_TK = odd[torch.rand(n_tokens, odd.numel()).argsort(1)[:, :top_k]]
    else:
        experts_TK = torch.rand(n_tokens, n_experts).argsort(1)[:, :top_k]
        if pattern == "dropped":
            experts_TK = experts_TK.masked_fill(torch.rand(n_tokens, top_k) < 0.25, -1)
    return experts_TK.to(device=device, dtype=torch.int32).contiguous()
