"""Whether what a benchmark times computes the right thing, checked in the same run.

A timing of a wrong kernel is no figure: run 4 timed a router whose per-expert counts
were wrong (benchmarks/RESULTS.md), and only the tests, run afterwards, said so. Each
GPU benchmark case therefore first compares its outputs (and, for a backward, the
gradients its op gives through autograd) with dsv3/reference.py's on the same inputs,
and its row says ``ok`` or what disagreed. The comparison is deliberately coarse: it
catches a kernel that is wrong, not one a rounding apart.

The reference runs through the same public ops with ``DSV3_BACKEND=reference`` (which
the ops read at every call), so no check compares a kernel with itself: raw
``torch.ops.dsv3`` calls, which that setting does not reach, are checked through the
public op that wraps the same kernel.
"""
from __future__ import annotations

import contextlib
import os

import torch

# Norm-relative error allowed in a floating-point output: 16-bit inputs and outputs,
# fp32 accumulation in another order, and a few near-tied expert choices flipped by
# a last-bit difference (a flipped choice changes two weights of a million).
FLOAT_TOLERANCE = 2e-2
# L1-relative difference allowed in an integer output (expert ids, counts, int8
# levels): the same few near-ties; run 4's wrong counts were off by half and more.
INTEGER_TOLERANCE = 1e-3


@contextlib.contextmanager
def reference_backend():
    """dsv3.ops calls inside take dsv3/reference.py's plain-PyTorch path."""
    before = os.environ.get("DSV3_BACKEND")
    os.environ["DSV3_BACKEND"] = "reference"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DSV3_BACKEND"]
        else:
            os.environ["DSV3_BACKEND"] = before


def _flat(outputs) -> list:
    if isinstance(outputs, torch.Tensor) or outputs is None:
        return [outputs]
    return [t for item in outputs for t in _flat(item)]


def disagreement(got, want) -> str | None:
    """None where every tensor of ``got`` matches ``want``'s within the tolerances,
    else which one did not and by how much."""
    got, want = _flat(got), _flat(want)
    if len(got) != len(want):
        return f"{len(got)} outputs against the reference's {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            if (g is None) != (w is None):
                return f"output {i}: None against a tensor"
            continue
        if tuple(g.shape) != tuple(w.shape):
            return f"output {i}: shape {tuple(g.shape)} against {tuple(w.shape)}"
        if g.dtype != w.dtype:
            return f"output {i}: dtype {g.dtype} against {w.dtype}"
        # On the tensors' device, in fp64: a GPU case's outputs run to 2^28 values, which
        # the host would take seconds of the run's budget to compare.
        g, w = g.detach().double(), w.detach().to(device=g.device, dtype=torch.float64)
        for what, where in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                            ("-inf", torch.isneginf)):
            if not torch.equal(where(g), where(w)):
                return f"output {i}: {what} in {int((where(g) != where(w)).sum())} other places"
        # the same non-finite places: left out, so that they neither hide nor make errors
        finite = torch.isfinite(w)
        g, w = torch.where(finite, g, 0.0), torch.where(finite, w, 0.0)
        if not got[i].is_floating_point():
            error = (g - w).abs().sum() / w.abs().sum().clamp_min(1)
            limit = INTEGER_TOLERANCE
        else:
            error = (g - w).norm() / w.norm().clamp_min(1e-30)
            limit = FLOAT_TOLERANCE
        if not error <= limit:
            return f"output {i}: relative error {error.item():.3g} > {limit}"
    return None


def outputs_against_reference(fn) -> str | None:
    """``fn()`` through the kernels against ``fn()`` through the reference."""
    got = fn()
    with reference_backend():
        want = fn()
    return disagreement(got, want)


def gradients(forward, inputs: list[torch.Tensor], grad_out) -> list[torch.Tensor]:
    """The gradients that ``forward(*inputs)``'s backward (from ``grad_out``, one per
    output that has one) gives each floating-point input."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    outputs = _flat(forward(*leaves))
    pairs = [(o, g) for o, g in zip(outputs, _flat(grad_out)) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [leaf.grad for leaf in leaves if leaf.requires_grad]


def reference_gradients(forward, inputs: list[torch.Tensor], grad_out) -> list[torch.Tensor]:
    """``gradients(forward, inputs, grad_out)`` through the reference."""
    with reference_backend():
        return gradients(forward, inputs, grad_out)


def gradients_against_reference(forward, inputs: list[torch.Tensor], grad_out) -> str | None:
    """``gradients(forward, inputs, grad_out)``, kernels against reference."""
    return disagreement(gradients(forward, inputs, grad_out),
                        reference_gradients(forward, inputs, grad_out))


def check_label(message: str | None) -> str:
    """A row's ``check`` cell."""
    return "ok" if message is None else f"FAILED: {message}"
