"""Triton grouped GEMM, host side: the forward/dgrad (``y_SY = x_SX @ w_EXY[e]`` per
expert segment) and wgrad (``dw_EXY[e] = x_e^T @ dy_e``) ops, their autotuning (per
shape, rows per expert and load pattern), the TMA descriptors they pass, the shape
checks the C++ kernel makes, and the raising of the flags the kernels clear on bad
offsets_E or token_S. The kernels themselves, and how they walk the tiles, are in
grouped_gemm_kernels.
"""
import torch
import triton

from dsv3.kernels import device_checks, tuning
from dsv3.kernels.grouped_gemm_kernels import _grouped_mm_kernel, _grouped_mm_wgrad_kernel
from dsv3.kernels.scratch import triton_scratch
from dsv3.kernels.tma_descriptors import has_tma, tma_descriptors, wgrad_descriptors
from dsv3.kernels.config import (dot_precision, matmul_configs, persistent_programs,
                                 prune_matmul, prune_wgrad, wgrad_configs)


# Row tiles per group of the tile order (the usual choice for Hopper-sized L2s).
GROUP_M = 8

# Tuned per (DIM_X, DIM_Y) and the power of two of the rows per expert (only a key:
# the kernels ignore it): the best tile and launch depend on how long each expert's
# row range is, which stays put for a given model and batch but not across them. And
# per load pattern: gathered rows (no TMA for x) and w's layout (the forward only),
# which would otherwise share the first call's pick. And per fp32 precision (TF32 or
# not), whose tiles run at different speeds. Each key names only its kernel's
# arguments: triton 3.9 rejects any other name.
_KEY = ["DIM_X", "DIM_Y", "rows_per_expert_log2", "GATHER", "W_KMAJOR", "PRECISION"]
_WGRAD_KEY = [name for name in _KEY if name != "W_KMAJOR"]


def _rows_per_expert_log2(n_rows: int, n_experts: int) -> int:
    return (n_rows // max(n_experts, 1)).bit_length()


def _forward_tuner(configs: list[triton.Config]):
    return tuning.autotune(_grouped_mm_kernel, configs, _KEY, prune_matmul)


_grouped_mm_tuned = _forward_tuner(matmul_configs())


def _wgrad_tuner(configs: list[triton.Config]):
    return tuning.autotune(_grouped_mm_wgrad_kernel, configs, _WGRAD_KEY, prune_wgrad)


_wgrad_tuned = _wgrad_tuner(wgrad_configs())


def grouped_mm(x_SX: torch.Tensor, w_EXY: torch.Tensor, offsets_E: torch.Tensor,
               token_S: torch.Tensor | None = None) -> torch.Tensor:
    """With ``token_S``, x_SX is x_TX and row s reads x_TX[token_S[s]]."""
    return _forward(_grouped_mm_tuned, x_SX, w_EXY, offsets_E, token_S)


def grouped_mm_with(config: triton.Config, x_SX: torch.Tensor, w_EXY: torch.Tensor,
                    offsets_E: torch.Tensor, token_S: torch.Tensor | None = None) -> torch.Tensor:
    """grouped_mm launched with ``config`` instead of the autotuner's pick: the tests run
    each variant (``USE_TMA``) this way, whatever configs the tuner holds. A one-config
    tuner, so that the config's pre-launch hook runs as in the tuned launch."""
    return _forward(_forward_tuner([config]), x_SX, w_EXY, offsets_E, token_S)


def _check_shapes(op: str, x, offsets_E, token_S, w_EXY=None, grad_y_SY=None) -> None:
    """The C++ kernel's shape checks: direct torch.ops calls reach the launchers without
    the Python wrappers' checks, and a tensor too small would be read past its end."""
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [rows, X], got {tuple(x.shape)}")
    if w_EXY is not None and (w_EXY.dim() != 3 or w_EXY.shape[1] != x.shape[1]):
        raise ValueError(f"{op}: expected x [rows, X] and w_EXY [E, X, Y], got "
                         f"{tuple(x.shape)} and {tuple(w_EXY.shape)}")
    if grad_y_SY is not None and grad_y_SY.dim() != 2:
        raise ValueError(f"{op}: grad_y_SY must be 2-D [S, Y], got {tuple(grad_y_SY.shape)}")
    for name, other in (("w_EXY", w_EXY), ("grad_y_SY", grad_y_SY)):
        if other is not None and other.dtype != x.dtype:  # as the C++ kernel's check
            raise TypeError(f"{op}: x and {name} must have one dtype, got {x.dtype} and "
                            f"{other.dtype}")
    n_experts = w_EXY.shape[0] if w_EXY is not None else offsets_E.numel()
    if offsets_E.dtype != torch.int32 or tuple(offsets_E.shape) != (n_experts,):
        raise ValueError(f"{op}: offsets_E must be int32 of shape [E={n_experts}], got "
                         f"{offsets_E.dtype} {tuple(offsets_E.shape)}")
    if token_S is not None and (token_S.dtype != torch.int32 or token_S.dim() != 1):
        raise ValueError(f"{op}: token_S must be 1-D int32, got {token_S.dtype} "
                         f"{tuple(token_S.shape)}")


def _dense(offsets_E, token_S):
    """offsets_E and token_S as the kernels index them (element i at ptr + i): a
    strided view (offsets[::2]) would be read as other values."""
    return offsets_E.contiguous(), token_S.contiguous() if token_S is not None else None


def _addressable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where the kernels' offsets within a row (or an
    expert's matrix) would pass 2^31 elements: those are int32 (the column index times
    its stride; only the row and expert offsets are 64-bit), and a column-major view
    that large (a transposed output's gradient) was read outside the tensor. Any
    ordinary layout has them far below that, and is passed as it is."""
    inner = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:])
                if size > 0)
    return t if inner < 2**31 else t.contiguous()


def _forward(kernel, x_SX, w_EXY, offsets_E, token_S):
    op = "grouped_mm_gather" if token_S is not None else "grouped_mm"
    _check_shapes(op, x_SX, offsets_E, token_S, w_EXY=w_EXY)
    offsets_E, token_S = _dense(offsets_E, token_S)
    x_SX, w_EXY = _addressable(x_SX), _addressable(w_EXY)
    n_rows = token_S.shape[0] if token_S is not None else x_SX.shape[0]
    dim_x = x_SX.shape[1]
    n_experts, _, dim_y = w_EXY.shape
    y_SY = torch.empty(n_rows, dim_y, device=x_SX.device, dtype=x_SX.dtype)
    if y_SY.numel() == 0:  # nothing to compute, so no program to check the inputs
        _check_without_kernel(op, offsets_E, n_rows, token_S, x_SX.shape[0])
        return y_SY
    block_e = triton.next_power_of_2(n_experts + 1)
    # Descriptors only where a config can use them (not with DSV3_AUTOTUNE=0's single
    # pointer config): building them costs host time on every call.
    descriptors = (tma_descriptors(x_SX, w_EXY, gathered=token_S is not None)
                   if _wants_tma(kernel) else None)
    x_desc, w_desc, w_kmajor = descriptors or (None, None, False)

    def grid(meta):
        # Upper bound of tiles: every segment adds at most one partial row tile.
        max_tiles = ((triton.cdiv(n_rows, meta["BLOCK_M"]) + n_experts + 1)
                     * triton.cdiv(dim_y, meta["BLOCK_N"]))
        tile = meta["BLOCK_M"] * meta["BLOCK_N"]
        return (min(max_tiles, persistent_programs(x_SX.device, tile)),)

    ok = _good_flags(x_SX.device, token_S)
    kernel[grid](
        x_SX, w_EXY, y_SY, offsets_E, token_S if token_S is not None else offsets_E, ok, x_desc,
        w_desc, n_rows, x_SX.shape[0], n_experts, dim_x, dim_y,
        _rows_per_expert_log2(n_rows, n_experts),
        *x_SX.stride(), *w_EXY.stride(), *y_SY.stride(),
        PRECISION=dot_precision(x_SX.dtype), GATHER=token_S is not None, W_KMAJOR=w_kmajor,
        BLOCK_E=block_e, GROUP_M=GROUP_M)
    _raise_on_bad_input(ok, op, n_rows, token_S, x_SX.shape[0])
    return y_SY


def _good_flags(device: torch.device, token_S) -> torch.Tensor:
    """The kernels' "input was good" flags: offsets_E's, which the first program writes,
    then, where rows are gathered, token_S's, set here and cleared by any tile that
    reads a bad token. Without a gather no launch is needed to set one (on a GPU, a
    fill per GEMM call saved)."""
    if token_S is None:
        return torch.empty(1, device=device, dtype=torch.int32)
    return device_checks.good_flags(device, 2)


def _raise_on_bad_input(ok: torch.Tensor, op: str, n_rows: int, token_S, n_tokens: int) -> None:
    """The C++ kernel's checks of offsets_E and token_S, from the flags the kernel cleared."""
    device_checks.raise_unless(ok[0], f"{op}: offsets_E must be non-decreasing and <= S={n_rows}")
    if token_S is not None:
        device_checks.raise_unless(ok[1], _bad_tokens_message(op, n_tokens))


def _bad_tokens_message(op: str, n_tokens: int) -> str:
    return f"{op}: token_S values must be rows of x ({n_tokens} rows)"


def _check_without_kernel(op: str, offsets_E: torch.Tensor, n_rows: int, token_S,
                          n_tokens: int) -> None:
    """The kernels' checks in torch ops, for calls with nothing to compute."""
    ends = offsets_E.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    ok = torch.stack([((ends >= starts) & (ends <= n_rows)).all(),
                      ((token_S >= 0) & (token_S < n_tokens)).all() if token_S is not None
                      else torch.ones((), dtype=torch.bool, device=offsets_E.device)])
    _raise_on_bad_input(ok, op, n_rows, token_S, n_tokens)


def _wants_tma(tuner) -> bool:
    return any(config.kwargs.get("USE_TMA") for config in tuner.configs)


def grouped_mm_gather(x_TX: torch.Tensor, w_EXY: torch.Tensor, offsets_E: torch.Tensor,
                      token_S: torch.Tensor, row_map_TK: torch.Tensor) -> torch.Tensor:
    return grouped_mm(x_TX, w_EXY, offsets_E, token_S)


def grouped_mm_wgrad(x_SX: torch.Tensor, grad_y_SY: torch.Tensor, offsets_E: torch.Tensor,
                     transposed: bool, token_S: torch.Tensor | None = None) -> torch.Tensor:
    if token_S is None or not _gather_first(x_SX, grad_y_SY, offsets_E, token_S):
        return _wgrad(_wgrad_tuned, x_SX, grad_y_SY, offsets_E, transposed, token_S)
    # The gathered rows copied first, then the plain wgrad: measured on an H200
    # (benchmarks/RESULTS.md, 2026-11-30), Mixtral's gate/up wgrad took 5.04 ms with
    # its rows gathered in the kernel (pointer loads: TMA reads whole tiles only)
    # against 3.52 ms on an expert-ordered copy (persistent, TMA), which costs about
    # 0.03 ms to write at copy bandwidth. _wgrad checks the rest (dtypes, devices).
    tokens_ok, token_S = _readable_tokens(x_SX.shape[0], offsets_E, token_S)
    grad_w = _wgrad(_wgrad_tuned, x_SX.index_select(0, token_S), grad_y_SY, offsets_E,
                    transposed, None)
    # After the kernel's own check of offsets_E, so the errors come in the kernel's order.
    device_checks.raise_unless(tokens_ok, _bad_tokens_message("grouped_mm_wgrad", x_SX.shape[0]))
    return grad_w


def _gather_first(x_TX: torch.Tensor, grad_y_SY: torch.Tensor, offsets_E: torch.Tensor,
                  token_S: torch.Tensor) -> bool:
    """Whether the wgrad copies its gathered rows before running: where that copy is
    no larger than grad_y_SY, which is live anyway, so the backward's memory grows by
    at most that much (Mixtral's gate/up: X=4096 against Y=28672). The rows of a
    DeepSeek-V3-like layer (X=7168, Y=4096) stay gathered in the kernel, and calls with
    nothing to compute or malformed keep the kernel path's checks."""
    if not (x_TX.dim() == grad_y_SY.dim() == 2 and offsets_E.dim() == token_S.dim() == 1
            and token_S.dtype == torch.int32
            and x_TX.device == grad_y_SY.device == offsets_E.device == token_S.device):
        return False
    return (0 < x_TX.shape[1] <= grad_y_SY.shape[1] and x_TX.shape[0] > 0
            and offsets_E.shape[0] > 0 and 0 < token_S.shape[0] == grad_y_SY.shape[0])


def _readable_tokens(n_tokens: int, offsets_E: torch.Tensor, token_S: torch.Tensor):
    """Whether every row the wgrad reads (those before offsets_E[-1]) names a row of x,
    as the gathering kernel checks, and token_S clamped into x so that the copy reads
    inside it whatever the other rows hold (a dropped copy's row may hold -1). On the
    device, no host sync."""
    rows_S = torch.arange(token_S.shape[0], device=token_S.device, dtype=torch.int32)
    bad_S = (rows_S < offsets_E[-1]) & ((token_S < 0) | (token_S >= n_tokens))
    return ~bad_S.any(), token_S.clamp(0, n_tokens - 1)


def grouped_mm_wgrad_with(config: triton.Config, x_SX: torch.Tensor, grad_y_SY: torch.Tensor,
                          offsets_E: torch.Tensor, transposed: bool,
                          token_S: torch.Tensor | None = None) -> torch.Tensor:
    """grouped_mm_wgrad launched with ``config`` instead of the autotuner's pick: the
    tests run each variant (``PERSISTENT``, ``USE_TMA``, ``FLATTEN``) this way, whatever
    configs the tuner holds. A one-config tuner, so that the config's pre-launch hook
    runs."""
    return _wgrad(_wgrad_tuner([config]), x_SX, grad_y_SY, offsets_E, transposed, token_S)


def _wgrad(kernel, x_SX, grad_y_SY, offsets_E, transposed, token_S):
    _check_shapes("grouped_mm_wgrad", x_SX, offsets_E, token_S, grad_y_SY=grad_y_SY)
    offsets_E, token_S = _dense(offsets_E, token_S)
    x_SX, grad_y_SY = _addressable(x_SX), _addressable(grad_y_SY)
    dim_x, dim_y, n_experts = x_SX.shape[1], grad_y_SY.shape[1], offsets_E.shape[0]
    if transposed:  # stored [E, Y, X], written through [E, X, Y] strides
        grad_w = torch.empty(n_experts, dim_y, dim_x, device=x_SX.device, dtype=x_SX.dtype)
        view_EXY = grad_w.transpose(1, 2)
    else:
        grad_w = view_EXY = torch.empty(n_experts, dim_x, dim_y, device=x_SX.device,
                                        dtype=x_SX.dtype)

    def grid(meta):
        tiles = triton.cdiv(dim_x, meta["BLOCK_M"]) * triton.cdiv(dim_y, meta["BLOCK_N"])
        if meta["PERSISTENT"]:
            return (min(n_experts * tiles,
                        persistent_programs(x_SX.device, meta["BLOCK_M"] * meta["BLOCK_N"])),)
        return (tiles, n_experts)

    op, n_rows = "grouped_mm_wgrad", grad_y_SY.shape[0]
    if (token_S.shape[0] if token_S is not None else x_SX.shape[0]) != n_rows:
        raise ValueError(f"{op}: expected x [S, X] (or x_TX with token_S [S]) and grad_y_SY "
                         f"[S, Y], got {tuple(x_SX.shape)} and {tuple(grad_y_SY.shape)}")
    if grad_w.numel() == 0:  # no tile, so no program to check the inputs
        _check_without_kernel(op, offsets_E, n_rows, token_S, x_SX.shape[0])
        return grad_w
    ok = _good_flags(x_SX.device, token_S)
    descriptors = (wgrad_descriptors(x_SX, grad_y_SY, gathered=token_S is not None)
                   if _wants_tma(kernel) else None)
    x_desc, dy_desc = descriptors or (None, None)
    # The flattened walk builds its TMA descriptors on the device, in memory Triton
    # asks its allocator for at launch.
    with triton_scratch(x_SX.device):
        kernel[grid](
            x_SX, grad_y_SY, view_EXY, offsets_E, token_S if token_S is not None else offsets_E,
            ok, x_desc, dy_desc, n_rows, x_SX.shape[0], n_experts, dim_x, dim_y,
            _rows_per_expert_log2(n_rows, n_experts),
            *x_SX.stride(), *grad_y_SY.stride(), *view_EXY.stride(),
            PRECISION=dot_precision(x_SX.dtype), GATHER=token_S is not None,
            BLOCK_E=triton.next_power_of_2(n_experts + 1), GROUP_M=GROUP_M)
    _raise_on_bad_input(ok, op, n_rows, token_S, x_SX.shape[0])
    return grad_w


__all__ = ["grouped_mm", "grouped_mm_gather", "grouped_mm_wgrad"]
