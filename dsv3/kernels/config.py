"""Launch settings shared by the Triton kernels: autotune configs (one small,
sane set on GPUs; a single config under the interpreter, where every program
runs at Python speed, and with ``DSV3_AUTOTUNE=0``, which the GPU test run sets
so that its many shapes do not each compile and time four configs), the size of
persistent launches and the tl.dot precision per dtype.

``DSV3_GEMM_VARIANTS=0`` keeps the GEMMs to their pointer-load grid launches: no
TMA loads, no persistent wgrad, no flattened loops. A way round a Triton or
driver that mishandles them, and what benchmarks/gpu_check.sh falls back to if a
benchmark loses the CUDA context."""
import functools
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("DSV3_AUTOTUNE", "1") != "0"
VARIANTS = os.environ.get("DSV3_GEMM_VARIANTS", "1") != "0"


def _tiles() -> list[triton.Config]:
    """The matmul tiles and launches, before any variant's flag."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
    default = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8,
                            num_stages=3)
    if not AUTOTUNE:
        return [default]
    return [
        default,
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


# Tile shapes (BLOCK_M, BLOCK_N, num_stages) that the autotuner also tries in a variant
# (the persistent wgrad, TMA loads; both GEMMs' flattened loops on the two 128-row
# ones): one program per SM (128x256), two (128x128) and four (64x128).
VARIANT_TILES = {(128, 256, 3), (128, 128, 3), (64, 128, 4)}


def _has_variant(config: triton.Config) -> bool:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages) in VARIANT_TILES


def matmul_configs() -> list[triton.Config]:
    """Forward/dgrad: the tiles with pointer loads, plus versions of a few of them whose
    loads go through Hopper's tensor memory accelerator (TMA: fewer registers and no
    address math, but whole boxes, so some rows are read only to be masked), and of the
    two largest with the tile loop flattened into the step loop (FLATTEN: one pipeline
    across tiles, so a tile's store no longer waits for the next tile's first loads;
    Triton's persistent-matmul tutorial flattens the same way). None was timed against
    the others yet, so the autotuner decides; the single config of the interpreter and
    of ``DSV3_AUTOTUNE=0`` stays the pointer one, and the tests run the others
    explicitly."""
    configs = [config_with(config, tma_block_shapes, USE_TMA=False, FLATTEN=False)
               for config in _tiles()]
    if INTERPRET or not AUTOTUNE or not VARIANTS:
        return configs
    tma = [config_with(config, USE_TMA=True) for config in configs if _has_variant(config)]
    flat = [config_with(config, FLATTEN=True) for config in configs + tma
            if config.kwargs["BLOCK_M"] == 128 and config.num_stages == 3
            and _has_variant(config)]
    return configs + tma + flat


def tma_block_shapes(nargs: dict) -> None:
    """Pre-launch hook of the forward's configs: a TMA descriptor's block shape is part
    of it, and the tiles are known only once a config is chosen, so the wrapper builds
    the descriptors with a dummy one (or none: tma_descriptors.tma_descriptors). The
    pointer configs run it too: the descriptors are arguments of every launch, and
    their block shapes part of the compiled kernel's signature."""
    if nargs["x_desc"] is not None:
        nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if nargs["w_desc"] is not None:
        w_block = ([nargs["BLOCK_N"], nargs["BLOCK_K"]] if nargs["W_KMAJOR"]
                   else [nargs["BLOCK_K"], nargs["BLOCK_N"]])
        nargs["w_desc"].block_shape = [1, *w_block]


def wgrad_tma_block_shapes(nargs: dict) -> None:
    """tma_block_shapes for the wgrad: x is read as [BLOCK_K rows, BLOCK_M] boxes (then
    transposed in shared memory), dy as [BLOCK_K rows, BLOCK_N]."""
    if nargs["x_desc"] is not None:
        nargs["x_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_M"]]
    if nargs["dy_desc"] is not None:
        nargs["dy_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def wgrad_configs() -> list[triton.Config]:
    """The tiles as the grid launch (a program per expert and tile) with pointer loads,
    plus versions of a few of them as a persistent launch (a fixed number of programs
    walking all the tiles) and with TMA loads, each launch, and of the two 128-row ones
    as the persistent TMA launch walking its tiles in one flattened loop (FLATTEN:
    grouped_gemm_kernels._wgrad_uniform_walk). Which wins depends on the GPU and on the
    rows per expert, so the autotuner decides; the single config of the interpreter and
    of ``DSV3_AUTOTUNE=0`` stays the pointer grid launch, and the tests run the others
    explicitly."""
    configs = [wgrad_variant(config) for config in _tiles()]
    short = [wgrad_variant(config) for config in SHORT_REDUCTION_TILES]
    if INTERPRET or not AUTOTUNE:
        return configs
    if not VARIANTS:
        return configs + short
    variants = [wgrad_variant(config, persistent, tma)
                for config in configs if _has_variant(config)
                for persistent, tma in ((True, False), (False, True), (True, True))]
    flat = [wgrad_variant(config, persistent=True, tma=True, flatten=True)
            for config in configs if _has_variant(config)
            and config.kwargs["BLOCK_M"] == 128 and config.num_stages == 3]
    return configs + variants + flat + short


def wgrad_variant(tile: triton.Config, persistent: bool = False, tma: bool = False,
                  flatten: bool = False) -> triton.Config:
    """The wgrad config of ``tile``'s blocks, warps and stages as the launch these flags
    name (flatten: a persistent TMA launch, register-capped where it shares an SM)."""
    return config_with(tile, wgrad_tma_block_shapes, PERSISTENT=persistent, USE_TMA=tma,
                       FLATTEN=flatten, maxnreg=_flat_wgrad_registers(tile) if flatten else None)


# Registers of a thread on sm_90: 64K a multiprocessor, at most 255 a thread.
SM90_REGISTERS = 65536


def _flat_wgrad_registers(config: triton.Config) -> int | None:
    """The register cap of a flattened wgrad config: where persistent_programs puts
    several programs on a multiprocessor they must share its registers (two 128x128
    programs of 256 threads: 128 each). Uncapped, the flattened 128x128 walk takes 150
    (sm_90, Triton 3.6 and 3.8), so only one would fit; capped, it spills a few values
    (tests/test_sm90_compile.py). None (no cap) where one program takes the SM."""
    per_sm = _programs_per_sm(config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])
    if per_sm == 1:
        return None
    return min(SM90_REGISTERS // (per_sm * config.num_warps * 32), 255)


# Wgrad tiles for experts of few rows (DeepSeek-V3 at 4096 tokens: 128 rows an expert,
# two BLOCK_K steps a tile). Their reduction is too short for deep pipelines to pay;
# the time goes to each tile's start and its store, which only more programs per SM
# hide. Two stages take half the shared memory of four: 4 programs of 64x128 fit an
# SM's 227 KB and 7 of 64x64, against 2 and 3 with four stages (registers allow it:
# 96 and 64 a thread, 128 threads; benchmarks/sm90_compile_check --sass). Tried only
# below SHORT_REDUCTION_ROWS rows per expert (prune_wgrad).
SHORT_REDUCTION_TILES = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
]
SHORT_REDUCTION_ROWS = 512


_KEEP = object()  # config_with's default register cap: the config's own


def config_with(config: triton.Config, pre_hook=None, maxnreg=_KEEP, **kwargs) -> triton.Config:
    """``config`` with its meta-parameters updated by ``kwargs``, its pre-launch hook
    replaced by ``pre_hook`` if given, and its register cap by ``maxnreg`` if given
    (None: no cap)."""
    return triton.Config({**config.kwargs, **kwargs}, num_warps=config.num_warps,
                         num_stages=config.num_stages,
                         maxnreg=config.maxnreg if maxnreg is _KEEP else maxnreg,
                         pre_hook=pre_hook or config.pre_hook)


# Shared memory one program may use on sm_90 (227 KB; CUDA guide, compute capability 9.0).
SM90_SHARED_BYTES = 232448


def shared_bytes(config: triton.Config, element: int, precision: str | None) -> int:
    """An upper estimate of the shared memory a grouped-GEMM config takes: its pipelined
    tiles (stages x (A tile + B tile)), and, where the loops are flattened and the dot
    runs on tensor cores (16-bit inputs, or fp32 as TF32), the result tile too: the
    pipeline's buffers stay live through each tile's store, so the layout change before
    it no longer reuses them. (Triton 3.6, sm_90: the fp32 TF32 flattened 128x128x64
    3-stage forward takes 262,144 B, its nested twin 196,608; bf16 flattened tiles add
    at most their result tile.)"""
    kw = config.kwargs
    pipeline = config.num_stages * element * kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"])
    tensor_cores = element < 4 or precision != "ieee"
    result = kw["BLOCK_M"] * kw["BLOCK_N"] * element if kw.get("FLATTEN") and tensor_cores else 0
    return pipeline + result


def prune_oversized(configs, named_args, **kwargs):
    """Autotune pre-filter: drop configs that cannot fit in shared memory for this dtype
    (shared_bytes); fp32's 4-stage 128x256 tiles need 288 KB. Launching them would only
    fail."""
    element = named_args["x_ptr"].element_size()
    precision = kwargs.get("PRECISION", named_args.get("PRECISION"))  # a keyword at launch
    fitting = [c for c in configs if shared_bytes(c, element, precision) <= SM90_SHARED_BYTES]
    return fitting or configs[:1]


def prune_matmul(configs, named_args, **kwargs):
    """prune_oversized, and without the TMA configs where the wrapper built no
    descriptors (tma_descriptors.tma_descriptors): they would time the pointer loads again."""
    return _prune_tma(configs, named_args["w_desc"] is None, named_args, **kwargs)


def prune_wgrad(configs, named_args, **kwargs):
    """prune_matmul for the wgrad (tma_descriptors.wgrad_descriptors), without the
    short-reduction tiles where experts have SHORT_REDUCTION_ROWS rows or more, and
    without the flattened walk where x has no descriptor (gathered rows, or TMA cannot
    read x): it reads both operands through TMA only."""
    if named_args["rows_per_expert_log2"] > SHORT_REDUCTION_ROWS.bit_length() - 1:
        configs = [c for c in configs if not _is_short_reduction(c)]
    if named_args["x_desc"] is None:
        configs = [c for c in configs if not c.kwargs.get("FLATTEN")]
    return _prune_tma(configs, named_args["dy_desc"] is None, named_args, **kwargs)


def _is_short_reduction(config: triton.Config) -> bool:
    return any(config.kwargs["BLOCK_M"] == short.kwargs["BLOCK_M"]
               and config.kwargs["BLOCK_N"] == short.kwargs["BLOCK_N"]
               and config.num_stages == short.num_stages for short in SHORT_REDUCTION_TILES)


def _prune_tma(configs, no_descriptors: bool, named_args, **kwargs):
    if no_descriptors:
        configs = [c for c in configs if not c.kwargs["USE_TMA"]]
    return prune_oversized(configs, named_args, **kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 only when the user allowed it for matmuls, as torch does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# Under the interpreter a few programs, so that each walks several tiles: the
# persistent loop is exercised by the CPU tests.
INTERPRETER_PROGRAMS = 3


def persistent_programs(device: torch.device, tile_elements: int) -> int:
    """Programs of a persistent launch: per SM, as many as fit for the tile size (a
    128x256 tile fills an SM; smaller tiles leave room for 2-4 programs, which hide
    each other's memory latency)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _programs_per_sm(tile_elements) * _sm_count(
        device.index if device.index is not None else torch.cuda.current_device())


def _programs_per_sm(tile_elements: int) -> int:
    return min(max(32768 // tile_elements, 1), 4)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
