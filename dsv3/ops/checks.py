"""Input checks shared by the public ops: a wrong shape, dtype, device or value
gets a ValueError/TypeError naming the op, the argument, what was expected and
what came, before any kernel runs."""
import math

import torch
from torch.autograd import forward_ad

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, value, *, dim: int | None = None, dtypes=None,
                 like: torch.Tensor | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({expected}), got {value.dtype}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{op}: {name} must be on {like.device}, got {value.device}")


# The largest int the op schemas' ``int`` (int64) takes.
INT64_MAX = 2**63 - 1


def check_int(op: str, name: str, value, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{op}: {name} must be in {bound}, got {value}")
    if value > INT64_MAX:
        # Past int64 the kernels' schema refused it with "Expected a value of type 'int'
        # ... but instead found type 'int'", and the reference path overflowed elsewhere.
        raise ValueError(f"{op}: {name} must be in [{low}, 2**63 - 1] (an int64), got {value}")


def check_tokens(op: str, name: str, value: torch.Tensor) -> None:
    if value.shape[0] == 0:
        raise ValueError(f"{op}: {name} must hold at least one token, got shape {tuple(value.shape)}")


def check_number(op: str, name: str, value) -> None:
    """A finite Python int or float (not a bool, a string or a tensor); under
    torch.compile a symbolic one passes unchecked."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if value != value or abs(value) == math.inf:  # math.isfinite breaks torch.compile's graph
        raise ValueError(f"{op}: {name} must be finite, got {value}")


def check_limit(op: str, limit, dtype: torch.dtype):
    """A gated activation's clamp ``limit``, as the schema's float: None (no clamp) or a
    finite number > 0 within ``dtype``'s range (rounded to the dtype, a larger one would be
    inf: no clamp, where torch's clamp refuses it); a symbolic one passes unchecked."""
    if limit is None:
        return None
    check_number(op, "limit", limit)
    if not isinstance(limit, (torch.SymInt, torch.SymFloat)) and limit <= 0:
        raise ValueError(f"{op}: limit must be > 0 (or None for no clamp), got {limit}")
    if isinstance(limit, int):
        limit = float(limit)
    if not isinstance(limit, torch.SymFloat) and limit > torch.finfo(dtype).max:
        raise ValueError(f"{op}: limit {limit} is past the range of h_S2F's {dtype} "
                         f"(max {torch.finfo(dtype).max})")
    return limit


def check_bool(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")


def check_no_forward_ad(op: str, *tensors) -> None:
    """The ops have reverse-mode formulas only, and torch.library drops a forward-mode
    tangent (forward_ad dual tensors, torch.func.jvp/jacfwd) without a word: the
    op's output would carry a zero tangent. Refuse instead. Free outside a
    forward-AD level (the level check is one int comparison)."""
    if forward_ad._current_level < 0 or torch.compiler.is_compiling():
        return
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and forward_ad.unpack_dual(tensor).tangent is not None:
            raise NotImplementedError(
                f"{op}: forward-mode AD (torch.func.jvp, jacfwd, forward_ad dual tensors) is "
                f"not supported: the dsv3 ops have reverse-mode gradients only")


def refuse_double_backward(backward_op: str, forward_op: str) -> None:
    """Register an autograd formula for ``backward_op`` (a kernel of ``forward_op``'s
    backward) that raises. Without one, torch's fallback lets create_graph=True build
    a graph through it whose second derivative is silently wrong (only a deprecation
    warning). The second derivatives are not implemented, so a clear error it is."""
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{forward_op}: double backward (differentiating its gradient: create_graph=True "
            f"then backward, torch.autograd.functional.hessian, gradient penalties) is not "
            f"supported; {backward_op} has no gradient formula")

    torch.library.register_autograd(backward_op, backward)
