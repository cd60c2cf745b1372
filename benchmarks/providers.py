"""The four things the layer benchmark compares, each as one forward+backward step.

Every provider of a (shape, dtype) sees the same input, the same output gradient
and the same expert weights (those of one seeded ``dsv3.MoE``), so their times
differ only by how they compute:

- ``dsv3``: the ``dsv3.MoE`` module (our kernels).
- ``reference``: ``dsv3.reference.moe``, the plain per-expert loop.
- ``grouped_mm``: the strongest peer on a stock torch: plain-torch routing and
  permutation around ``torch._grouped_mm``.
- ``dense``: a reference point, not a floor. One dense SwiGLU FFN over the T·K
  routed rows does the same GEMM FLOPs as the layer with none of its routing or
  permutation, but in two large GEMMs with an unfused SwiGLU (silu, mul, chunk and
  its backward's cat): dsv3's fused SwiGLU and per-expert GEMMs have run faster
  than it (dsv3/dense 0.84-0.98 in quiet runs).

A step drops the gradients of its leaves before running, so every call does the
same work (first assignment of .grad, never accumulation) and a memory probe can
free them to take its baseline.
"""
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dsv3

PROVIDERS = ("dsv3", "reference", "grouped_mm", "dense")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_SHAPE_RE = re.compile(r"T(\d+)-D(\d+)-F(\d+)-E(\d+)-K(\d+)")


@dataclass(frozen=True)
class Shape:
    T: int  # tokens
    D: int  # model dim
    F: int  # expert hidden dim
    E: int  # experts
    K: int  # experts per token

    @property
    def name(self) -> str:
        return f"T{self.T}-D{self.D}-F{self.F}-E{self.E}-K{self.K}"

    @property
    def flops(self) -> int:
        """GEMM FLOPs of one forward+backward: the forward is 2·S·D·2F (gate and up)
        plus 2·S·F·D (down); the backward does each GEMM twice (dgrad and wgrad)."""
        return 3 * 6 * self.T * self.K * self.D * self.F

    @classmethod
    def parse(cls, name: str) -> "Shape":
        match = _SHAPE_RE.fullmatch(name)
        if match is None:
            raise ValueError(f"shape must look like T4096-D512-F1024-E8-K2, got {name!r}")
        return cls(*map(int, match.groups()))


# The shapes of the issue: few large experts, many small ones, and many small ones
# with a wide top-k (S = 4·T rows).
SHAPES = (Shape(4096, 512, 1024, 8, 2), Shape(4096, 512, 256, 64, 2), Shape(4096, 512, 256, 64, 8))


class Unavailable(Exception):
    """This provider cannot run here (a missing or unsupported peer op)."""


@dataclass
class Step:
    forward: Callable[[], torch.Tensor]
    grad: torch.Tensor  # the fixed output gradient
    leaves: list[torch.Tensor]  # everything that receives a gradient

    def drop_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def __call__(self) -> None:
        self.drop_grads()
        self.forward().backward(self.grad)


def grouped_mm_layer(x_TD, router_ED, gate_up_E2FD, down_EDF, top_k):
    """An MoE layer as one would write it on stock torch: route in fp32 (bf16
    scores tie), sort the routed copies by expert, two ``torch._grouped_mm`` calls
    around SwiGLU, then scatter-add the weighted rows back to their tokens."""
    n_experts = gate_up_E2FD.shape[0]
    logits_TE = F.linear(x_TD.float(), router_ED.float())
    weights_TK, experts_TK = logits_TE.softmax(-1).topk(top_k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    order_S = experts_TK.flatten().argsort(stable=True)
    token_S = order_S // top_k
    offsets_E = torch.bincount(experts_TK.flatten(), minlength=n_experts).cumsum(0).to(torch.int32)
    x_SD = x_TD[token_S]
    h_S2F = torch._grouped_mm(x_SD, gate_up_E2FD.transpose(-2, -1), offs=offsets_E)
    gate_SF, up_SF = h_S2F.chunk(2, dim=-1)
    y_SD = torch._grouped_mm(F.silu(gate_SF) * up_SF, down_EDF.transpose(-2, -1), offs=offsets_E)
    y_SD = y_SD * weights_TK.flatten()[order_S, None].to(y_SD.dtype)
    return torch.zeros_like(x_TD).index_add(0, token_S, y_SD)


@functools.cache
def unavailable_reason(provider: str, dtype: torch.dtype) -> str | None:
    """Why ``provider`` cannot run in ``dtype`` on this machine, or None if it can.
    Only the peer depends on the installed torch; it is probed with a tiny
    forward+backward so a missing CPU kernel shows up as a table note, not a crash."""
    if provider != "grouped_mm":
        return None
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    x_SD = torch.randn(32, 16, dtype=dtype, requires_grad=True)
    w_EDY = torch.randn(2, 16, 16, dtype=dtype, requires_grad=True)
    offsets_E = torch.tensor([16, 32], dtype=torch.int32)
    try:
        y_SY = torch._grouped_mm(x_SD, w_EDY.transpose(-2, -1), offs=offsets_E)
        y_SY.backward(torch.randn_like(y_SY))
    except (RuntimeError, NotImplementedError) as error:
        return f"torch._grouped_mm fwd+bwd fails on CPU in {dtype}: {str(error).splitlines()[0]}"
    return None


def make_step(provider: str, shape: Shape, dtype: torch.dtype, seed: int = 0,
              n_shared_experts: int = 0) -> Step:
    """One forward+backward of ``provider`` at ``shape``; raises Unavailable. Shared
    experts (``n_shared_experts`` of F each) only for dsv3: the peers' layers here have
    none."""
    reason = unavailable_reason(provider, dtype)
    if reason is not None:
        raise Unavailable(reason)
    if n_shared_experts and provider != "dsv3":
        raise ValueError(f"n_shared_experts: only the dsv3 layer has shared experts here, "
                         f"not {provider!r}")
    torch.manual_seed(seed)
    config = dsv3.MoEConfig(dim=shape.D, ffn_dim=shape.F, n_experts=shape.E, top_k=shape.K,
                            aux_loss_coef=0.0, n_shared_experts=n_shared_experts)
    moe = dsv3.MoE(config, dtype=dtype)
    x_TD = torch.randn(shape.T, shape.D, dtype=dtype, requires_grad=True)
    grad_TD = torch.randn(shape.T, shape.D, dtype=dtype)
    weights = [moe.router.weight, moe.gate_up_proj, moe.down_proj]

    if provider == "dsv3":
        # the peers' leaves, in their order, then the shared experts' weights
        shared = list(moe.shared_experts.parameters()) if n_shared_experts else []
        return Step(lambda: moe(x_TD), grad_TD, [x_TD, *weights, *shared])
    if provider == "reference":
        return Step(lambda: dsv3.reference.moe(x_TD, *weights, top_k=shape.K)[0], grad_TD,
                    [x_TD, *weights])
    if provider == "grouped_mm":
        return Step(lambda: grouped_mm_layer(x_TD, *weights, shape.K), grad_TD, [x_TD, *weights])
    if provider == "dense":
        # One expert's weights applied to every routed copy: the layer's GEMMs
        # without the layer. Fresh leaves, so the MoE's parameters stay untouched.
        x_SD = x_TD.detach().repeat_interleave(shape.K, dim=0).requires_grad_()
        w_2FD = moe.gate_up_proj[0].detach().clone().requires_grad_()
        w_DF = moe.down_proj[0].detach().clone().requires_grad_()
        grad_SD = grad_TD.repeat_interleave(shape.K, dim=0)

        def dense_ffn():
            gate_SF, up_SF = F.linear(x_SD, w_2FD).chunk(2, dim=-1)
            return F.linear(F.silu(gate_SF) * up_SF, w_DF)

        return Step(dense_ffn, grad_SD, [x_SD, w_2FD, w_DF])
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def outputs_and_gradients(step: Step) -> list[torch.Tensor]:
    """What one call of ``step`` computes: its output and its leaves' gradients."""
    step.drop_grads()
    y = step.forward()
    y.backward(step.grad)
    return [y.detach()] + [leaf.grad for leaf in step.leaves]


@functools.cache
def reference_outputs(shape: Shape, dtype: torch.dtype) -> list[torch.Tensor]:
    """The reference loop's output and gradients at (shape, dtype), the truth the other
    MoE providers are checked against (computed once per case)."""
    return outputs_and_gradients(make_step("reference", shape, dtype))
