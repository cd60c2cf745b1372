"""Input checks shared by the public ops: a wrong shape, dtype, device or value
gets a ValueError/TypeError naming the op, the argument, what was expected and
what came, before any kernel runs."""
import torch

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


def check_int(op: str, name: str, value, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{op}: {name} must be in {bound}, got {value}")


def check_tokens(op: str, name: str, value: torch.Tensor) -> None:
    if value.shape[0] == 0:
        raise ValueError(f"{op}: {name} must hold at least one token, got shape {tuple(value.shape)}")
