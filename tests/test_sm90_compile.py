"""Every Triton kernel compiles for the H100/H200 (sm_90) here, with no GPU: a
kernel that only the interpreter has run can still fail Triton's GPU compiler or
ask for more shared memory than the chip has. The grouped GEMM must also reach
Hopper's wgmma tensor-core instructions, or it runs on a much slower path."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every autotune config, the variants' included: DSV3_AUTOTUNE=0 would keep one (and
# the kept-picks test sets its own DSV3_AUTOTUNE_CACHE).
ENV = {k: v for k, v in os.environ.items()
       if k not in ("TRITON_INTERPRET", "DSV3_BACKEND", "DSV3_AUTOTUNE", "DSV3_GEMM_VARIANTS",
                    "DSV3_AUTOTUNE_CACHE")}


def _run_script(script: str, timeout: int):
    """Runs ``script`` in a fresh interpreter (install() swaps Triton's driver and launcher
    for the whole process) and returns the JSON its last line prints."""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_triton_kernels_compile_for_sm90():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.sm90_compile_check", "--dtypes", "bfloat16"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    gemm_lines = [line for line in result.stdout.splitlines() if "_grouped_mm" in line]
    assert len(gemm_lines) >= 8, report
    assert all("wgmma=True" in line for line in gemm_lines), report
    kernels = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok")}
    assert {"_route_kernel", "_route_backward_kernel", "_permute_rows_kernel", "_unpermute_kernel",
            "_swiglu_kernel", "_quantize_kernel", "_dequantize_kernel"} <= kernels, report


# In a subprocess: install() swaps Triton's driver and launcher for the whole process.
_SASS_SCRIPT = """
import json, torch
from benchmarks import sm90_compile_check as check
check.install()
from dsv3.kernels import grouped_gemm, swiglu
grouped_gemm.grouped_mm(torch.randn(64, 32, dtype=torch.bfloat16),
                        torch.randn(4, 32, 48, dtype=torch.bfloat16),
                        torch.tensor([0, 16, 40, 64], dtype=torch.int32))
swiglu.swiglu(torch.randn(64, 96, dtype=torch.bfloat16))
first = {}
for entry in check.COMPILED:  # the autotuner compiled every config: one of each kernel
    first.setdefault(entry["kernel"], entry["cubin"])
    if entry["config"].get("USE_TMA"):  # and the forward's TMA variant
        first.setdefault("tma", entry["cubin"])
print(json.dumps({kernel: check.sass_stats(cubin) for kernel, cubin in first.items()}))
"""


def test_sass_stats_of_sm90_cubins():
    """nvdisasm ships with Triton, so a missing one fails here rather than skipping."""
    stats = _run_script(_SASS_SCRIPT, timeout=300)
    gemm, swiglu = stats["_grouped_mm_kernel"], stats["_swiglu_kernel"]
    for kernel in (gemm, swiglu):
        assert 0 < kernel["regs"] <= 255
        assert kernel["sass"] == sum(kernel["opcodes"].values()) > 0
        assert kernel["opcodes"]["EXIT"] >= 1
        # the classes share no opcode, so together they are part of the total
        classes = {name: n for name, n in kernel.items() if name not in ("regs", "sass", "opcodes")}
        assert len(classes) >= 12 and sum(classes.values()) <= kernel["sass"]
        assert kernel["ldg"] > 0 and kernel["stg"] > 0
    # bf16 tiles reach Hopper's wgmma, not the older mma.sync
    assert gemm["gmma"] > 0 and gemm["hmma"] == 0
    # The pointer loads copy to shared memory with cp.async (LDGSTS), the TMA variant's
    # with the tensor memory accelerator (UTMALDG) alone, feeding wgmma all the same.
    tma = stats["tma"]
    assert gemm["opcodes"].get("LDGSTS", 0) > 0 and gemm["opcodes"].get("UTMALDG", 0) == 0
    assert tma["opcodes"].get("UTMALDG", 0) > 0 and tma["opcodes"].get("LDGSTS", 0) == 0
    assert tma["gmma"] > 0 and tma["hmma"] == 0
    # SwiGLU's sigmoid needs exp2 and a reciprocal: the special-function unit, no MMA
    assert swiglu["mufu"] > 0 and swiglu["gmma"] == swiglu["hmma"] == 0



_ROUTER_SASS_SCRIPT = """
import json, torch
from benchmarks import sm90_compile_check as check
check.install()
from dsv3.kernels import router, router_backward
stats = {}
for dtype in (torch.float32, torch.bfloat16):
    logits = torch.randn(300, 256, dtype=dtype)
    router.route(logits, 8, "sigmoid", torch.randn(256), 8, 4, True, 2.5, False)
    stats[f"forward {dtype}"] = check.sass_stats(check.COMPILED[-1]["cubin"])
    # softmax over 60 experts, and 160 with a bias (a slab partly past the row's end)
    for E, K, bias in ((60, 4, None), (160, 6, torch.randn(160))):
        router.route(torch.randn(300, E, dtype=dtype), K, "softmax", bias, 1, 1, True, 1.0,
                     False)
        stats[f"forward E{E} {dtype}"] = check.sass_stats(check.COMPILED[-1]["cubin"])
    router_backward.route_backward(torch.rand(300, 8), torch.randn(256), torch.randn(()), logits,
                          torch.randint(0, 256, (300, 8), dtype=torch.int32), "sigmoid", True,
                          2.5)
    stats[f"backward {dtype}"] = check.sass_stats(check.COMPILED[-1]["cubin"])
print(json.dumps({name: {k: s[k] for k in ("shfl", "stl", "sass", "regs")}
                  for name, s in stats.items()}))
"""


def test_router_keeps_one_token_a_thread():
    """DeepSeek-V3's router (256 experts, top-8, 4 of 8 groups), two softmax routers (60
    and 160 experts) and DeepSeek-V3's backward keep a token's row in one thread: their
    reductions over experts need no shuffles and they do not spill. Under Triton 3.6
    (the GPU machine's) the plain loads put the experts across the lanes: 2930
    shuffles, 15.8k instructions and spills before the router loaded its tiles
    token-major there (router._TOKENS_OUTER); ``make check-triton`` runs this file
    under 3.6."""
    stats = _run_script(_ROUTER_SASS_SCRIPT, timeout=600)
    for name, kernel in stats.items():
        # a few shuffles are the per-program flags (the forward's NaN flag). (The loss
        # sums, route(stats=True), add sums over the block's tokens: shuffles by design.)
        assert kernel["shfl"] <= 8 and kernel["stl"] == 0, (name, stats)
    # DeepSeek-V3's top-8 by the bitonic network (router._network): 8,800 instructions and
    # 228 registers a thread in rounds under 3.6 (8,544 / 210 under 3.8), 6,648 / 113
    # (6,392 / 102) by the network.
    for dtype in ("torch.float32", "torch.bfloat16"):
        forward = stats[f"forward {dtype}"]
        assert forward["sass"] < 7500 and forward["regs"] <= 128, (dtype, forward)



# The preamble of the scripts that read one compiled kernel's TTGIR or SASS: compile-only
# launches (check.install) whose compiled kernels are kept in ``compiled``.
_KEEP_COMPILED = """
import json, re, torch, triton
from triton.runtime.jit import JITFunction
from benchmarks import sm90_compile_check as check
check.install()
compiled = []
launch = JITFunction.run
def keep(self, *args, **kwargs):
    compiled.append(launch(self, *args, **kwargs))
    return compiled[-1]
JITFunction.run = keep
"""


_WGRAD_PIPELINE_SCRIPT = _KEEP_COMPILED + """
from dsv3.kernels import grouped_gemm
from dsv3.kernels.config import config_with, wgrad_tma_block_shapes
x_TX = torch.randn(512, 256, dtype=torch.bfloat16)
x_SX = torch.randn(1024, 256, dtype=torch.bfloat16)
dy_SY = torch.randn(1024, 512, dtype=torch.bfloat16)
offsets_E = torch.linspace(0, 1024, 8, dtype=torch.int32)
token_S = torch.arange(1024, dtype=torch.int32) // 2
report = {}
for persistent in (False, True):
    for tma in (False, True):
        config = config_with(triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
                                           num_warps=8, num_stages=3),
                             wgrad_tma_block_shapes, PERSISTENT=persistent, USE_TMA=tma)
        waits = {}
        for gathered in (False, True):
            if gathered:
                grouped_gemm.grouped_mm_wgrad_with(config, x_TX, dy_SY, offsets_E, True, token_S)
            else:
                grouped_gemm.grouped_mm_wgrad_with(config, x_SX, dy_SY, offsets_E, True)
            waits[gathered] = [int(n) for n in
                               re.findall(r"async_wait[^\\n]*num = (\\d+)", compiled[-1].asm["ttgir"])]
        ptx = compiled[-1].asm["ptx"]
        report[f"persistent={persistent} tma={tma}"] = {
            "plain": waits[False], "gathered": waits[True],
            "token_reads": len(re.findall(r"ld\\.global\\.nc\\.b32", ptx)),
            "unguarded": len(re.findall(r"^\\s*ld\\.global\\.nc\\.b32", ptx, re.M))}
print(json.dumps(report))
"""


def test_gathered_wgrad_loop_is_pipelined():
    """The wgrad reading its rows through token_S keeps its loads in flight as the plain
    one does. Read with tl.load, the tokens became an async copy grouped with the tiles
    they address, and each step waited for every copy (async_wait num = 0); they are read
    in PTX instead, each read guarded by its row's liveness, since the pipeliner issues
    the first steps' reads before it knows the loop runs (an empty expert's would land
    outside token_S)."""
    report = _run_script(_WGRAD_PIPELINE_SCRIPT, timeout=600)
    for launch, loop in report.items():
        assert loop["token_reads"] > 0 and loop["unguarded"] == 0, (launch, report)
        # x through pointers: the same waits gathered as on expert-ordered rows (3 stages:
        # 2 steps in flight); with dy through TMA only x's copies are waited on.
        if "tma=False" in launch:
            assert loop["gathered"] == loop["plain"] and max(loop["plain"]) > 0, (launch, report)
        else:
            assert max(loop["gathered"]) > 0, (launch, report)


# The scf.for holding a TTGIR's first async wgmma, as its lines. (MLIR indents 2 per
# region: the body is what follows, indented deeper.)
_STEP_LOOP = """
def step_loop(ttgir):
    lines = ttgir.splitlines()
    dot = next(i for i, line in enumerate(lines)
               if "warp_group_dot " in line and "isAsync = true" in line)
    indent = lambda line: len(line) - len(line.lstrip())
    loop = next(i for i in range(dot, -1, -1)
                if "scf.for" in lines[i] and indent(lines[i]) < indent(lines[dot]))
    end = next(i for i in range(dot, len(lines)) if indent(lines[i]) <= indent(lines[loop]))
    return lines[loop:end]
"""


_FLAT_FORWARD_SCRIPT = _KEEP_COMPILED + _STEP_LOOP + """
from dsv3.kernels import grouped_gemm
from dsv3.kernels.config import config_with, tma_block_shapes

def store_in_step_loop(ttgir):  # does the loop running the wgmma also store the tile?
    return any(re.search(r"tt.store .*tensor<128x256x", line) for line in step_loop(ttgir))

x_SX = torch.randn(1024, 256, dtype=torch.bfloat16)
w_EXY = torch.randn(8, 256, 512, dtype=torch.bfloat16)
offsets_E = torch.linspace(0, 1000, 8, dtype=torch.int32)
token_S = torch.arange(1024, dtype=torch.int32) // 2
report = {}
for tma, gathered in ((False, False), (True, False), (True, True)):
    for flatten in (False, True):
        config = config_with(triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64},
                                           num_warps=8, num_stages=3),
                             tma_block_shapes, USE_TMA=tma, FLATTEN=flatten)
        if gathered:  # x's rows through token_S (pointers), w through TMA
            grouped_gemm.grouped_mm_with(config, x_SX[:512], w_EXY, offsets_E, token_S)
        else:
            grouped_gemm.grouped_mm_with(config, x_SX, w_EXY, offsets_E)
        stats = check.sass_stats(compiled[-1].asm["cubin"])
        report[f"tma={tma} gathered={gathered} flatten={flatten}"] = {
            "store_in_step_loop": store_in_step_loop(compiled[-1].asm["ttgir"]),
            "stl": stats["stl"], "regs": stats["regs"]}
print(json.dumps(report))
"""


def test_forward_flattens_its_loops():
    """FLATTEN=True has Triton fuse the forward's tile loop and step loop into one, so the
    next tile's loads are in flight while a tile stores (the store sits in the loop that
    runs the wgmma); FLATTEN=False keeps them nested. The fused loop does not spill at
    128x256 (8 experts), gathered rows included where w takes TMA (with both operands
    through pointers it spills: 50 stores under 3.6, left to the autotuner). The fusion
    needs every tile to run the same steps: the dropped-copies tail, which has no
    steps, is stored in a loop of its own (with it in the same loop Triton 3.6 left the
    loops nested)."""
    report = _run_script(_FLAT_FORWARD_SCRIPT, timeout=600)
    for launch, kernel in report.items():
        assert kernel["store_in_step_loop"] == ("flatten=True" in launch), (launch, report)
        assert kernel["stl"] == 0 or "flatten=False" in launch, (launch, report)


_FLAT_WGRAD_SCRIPT = _KEEP_COMPILED + _STEP_LOOP + """
from dsv3.kernels import config, grouped_gemm
x_SX = torch.randn(1000, 256, dtype=torch.bfloat16)
dy_SY = torch.randn(1000, 512, dtype=torch.bfloat16)
offsets_E = torch.tensor([100, 300, 301, 700, 1000], dtype=torch.int32)
report = {}
for block_n in (128, 256):
    for flatten in (False, True):
        # The autotuner's persistent TMA config of this tile, nested or flattened.
        tuned, = [c for c in config.wgrad_configs()
                   if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) == (128, block_n, 3)
                   and c.kwargs["PERSISTENT"] and c.kwargs["USE_TMA"]
                   and c.kwargs["FLATTEN"] == flatten]
        grouped_gemm.grouped_mm_wgrad_with(tuned, x_SX, dy_SY, offsets_E, True)
        ttgir = compiled[-1].asm["ttgir"]
        loop = step_loop(ttgir)
        stats = check.sass_stats(compiled[-1].asm["cubin"])
        report[f"128x{block_n} flatten={flatten}"] = {
            "capped": tuned.maxnreg is not None,
            # the registers of the programs persistent_programs puts on one SM
            "sm_registers": (stats["regs"] * tuned.num_warps * 32
                             * config._programs_per_sm(128 * block_n)),
            "store_in_step_loop": any(re.search(rf"tt.store .*tensor<128x{block_n}x", line)
                                      for line in loop),
            "tma_copies_in_step_loop": sum("async_tma_copy_global_to_local" in line
                                           for line in loop),
            "tma_copies": ttgir.count("async_tma_copy_global_to_local"),
            "descriptors_in_step_loop": sum("tensormap_create" in line for line in loop),
            "stl": stats["stl"]}
print(json.dumps(report))
"""


def test_wgrad_flattens_its_uniform_walk():
    """FLATTEN has the persistent TMA wgrad walk its tiles in one fused loop
    (grouped_gemm_kernels._wgrad_uniform_walk): the loop running the wgmma also stores
    dw's tile and builds each tile's descriptors, and its TMA copies stay pipelined (the
    first stages' copies issued before it). Without FLATTEN the first wgmma's loop is a
    tile's reduction, which stores nothing. The programs the persistent launch puts on
    an SM fit its 64K registers: the 128x128 walk (two an SM) only with its register
    cap, under which it spills a few values (3 under Triton 3.8, 6 under 3.6: more would
    be worth a look); uncapped configs do not spill."""
    report = _run_script(_FLAT_WGRAD_SCRIPT, timeout=600)
    for launch, kernel in report.items():
        flat = "flatten=True" in launch
        assert kernel["store_in_step_loop"] == flat, (launch, report)
        assert (kernel["descriptors_in_step_loop"] > 0) == flat, (launch, report)
        assert kernel["tma_copies_in_step_loop"] >= 2, (launch, report)
        assert kernel["tma_copies"] > kernel["tma_copies_in_step_loop"], (launch, report)
        assert kernel["sm_registers"] <= 65536, (launch, report)
        assert kernel["stl"] == 0 or (kernel["capped"] and kernel["stl"] <= 8), (launch, report)
    assert report["128x128 flatten=True"]["capped"], report


_WGRAD_TAIL_SCRIPT = _KEEP_COMPILED + """
from dsv3.kernels import grouped_gemm
from dsv3.kernels.config import config_with, wgrad_tma_block_shapes
x_SX = torch.randn(1000, 256, dtype=torch.bfloat16)
dy_SY = torch.randn(1000, 512, dtype=torch.bfloat16)
offsets_E = torch.tensor([100, 300, 301, 700, 1000], dtype=torch.int32)
token_S = torch.arange(1000, dtype=torch.int32) // 2
report = {}
for block_n in (128, 256):
    for persistent in (False, True):
        for gathered in (False, True):
            config = config_with(triton.Config({"BLOCK_M": 128, "BLOCK_N": block_n,
                                                "BLOCK_K": 64}, num_warps=8, num_stages=3),
                                 wgrad_tma_block_shapes, PERSISTENT=persistent, USE_TMA=True)
            if gathered:  # x's rows through token_S (pointers, LDGSTS in the loop)
                grouped_gemm.grouped_mm_wgrad_with(config, x_SX[:500], dy_SY, offsets_E, True,
                                                   token_S)
            else:
                grouped_gemm.grouped_mm_wgrad_with(config, x_SX, dy_SY, offsets_E, True)
            ops = check.sass_opcodes(compiled[-1].asm["cubin"])
            first_copy = next(i for i, op in enumerate(ops) if op.startswith("UTMALDG"))
            report[f"128x{block_n} persistent={persistent} gathered={gathered}"] = {
                "tail_loads": [i for i, op in enumerate(ops) if op == "LDG.E.128"],
                "tail_stores": [i for i, op in enumerate(ops) if op == "STS.128"],
                "first_copy": first_copy,
                "stl": check.sass_stats(compiled[-1].asm["cubin"])["stl"]}
print(json.dumps(report))
"""


def test_wgrad_tail_loads_overlap_the_loop():
    """The TMA wgrad's partial last step (rows up to the expert's end, through masked
    pointers) is loaded before the loop's first TMA copy and stored to shared memory
    only after it, so the loop runs while those loads are in flight. Loaded after the
    loop, every tile waited one more round trip; loaded before it but stored there
    (Triton stores a dot's operands right after their loads), the loop's copies waited
    for them instead (grouped_gemm_kernels._held)."""
    report = _run_script(_WGRAD_TAIL_SCRIPT, timeout=600)
    for launch, kernel in report.items():
        assert kernel["tail_loads"] and kernel["tail_stores"], (launch, report)
        assert max(kernel["tail_loads"]) < kernel["first_copy"], (launch, report)
        assert min(kernel["tail_stores"]) > kernel["first_copy"], (launch, report)
        assert kernel["stl"] == 0, (launch, report)


_SIDE_BY_SIDE_SCRIPT = """
import json, threading, torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from benchmarks import sm90_compile_check as check
tuners_run = Autotuner.run
check.install()
Autotuner.run = tuners_run  # Triton's own autotuner, its timing stubbed (nothing launches)
from dsv3.kernels import grouped_gemm, tuning
for tuner in (grouped_gemm._grouped_mm_tuned, grouped_gemm._wgrad_tuned):
    tuner._do_bench = lambda kernel_call, quantiles: (kernel_call(), [1.0, 1.0, 1.0])[1]
    tuner.__dict__.pop("do_bench", None)  # a cached property in some Triton versions
tuning.COMPILE_THREADS = 4
on_main_thread = []  # one entry per compilation
compile = JITFunction._do_compile
def counted(self, *args, **kwargs):
    on_main_thread.append(threading.current_thread() is threading.main_thread())
    return compile(self, *args, **kwargs)
JITFunction._do_compile = counted
x = torch.randn(64, 32, dtype=torch.bfloat16)
offsets = torch.tensor([16, 40, 64], dtype=torch.int32)
# nn.Linear's layout, which the TMA configs read K-major, then the wgrad: two keys
grouped_gemm.grouped_mm(x, torch.randn(3, 48, 32, dtype=torch.bfloat16).transpose(1, 2), offsets)
grouped_gemm.grouped_mm_wgrad(x, torch.randn(64, 48, dtype=torch.bfloat16), offsets, False)
print(json.dumps({"on_main_thread": on_main_thread, "kernels": len(check.COMPILED),
                  "tma": sum(bool(e["config"].get("USE_TMA")) for e in check.COMPILED),
                  "timed": [len(grouped_gemm._grouped_mm_tuned.configs_timings),
                            len(grouped_gemm._wgrad_tuned.configs_timings)],
                  "kept": [[len(timed) for timed in tuner.timings.values()]
                           for tuner in (grouped_gemm._grouped_mm_tuned,
                                         grouped_gemm._wgrad_tuned)]}))
"""


def test_autotuner_compiles_configs_side_by_side_and_times_those_kernels():
    """dsv3/kernels/tuning.py compiles a new key's configs in threads; Triton's
    autotuner must then time each one without compiling it again (same
    specialization, the TMA descriptors' block shapes included)."""
    report = _run_script(_SIDE_BY_SIDE_SCRIPT, timeout=300)
    on_main_thread = report["on_main_thread"]
    assert report["tma"] > 0
    forward_timed, wgrad_timed = report["timed"]
    assert len(on_main_thread) == report["kernels"] == forward_timed + wgrad_timed  # once each
    assert forward_timed >= 6 and wgrad_timed >= 6
    assert report["kept"] == [[forward_timed], [wgrad_timed]]  # each key's timings kept
    assert on_main_thread.count(True) == 2  # a key's first config; the others in threads


_KEPT_PICKS_SCRIPT = """
import json, torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from benchmarks import sm90_compile_check as check
tuners_run = Autotuner.run
check.install()
Autotuner.run = tuners_run  # Triton's own autotuner, its timing stubbed (nothing launches)
from dsv3.kernels import autotune_cache, grouped_gemm
autotune_cache.device_name = lambda named_args: "stand-in sm_90"  # picks are kept for GPUs
timed = []
for tuner in (grouped_gemm._grouped_mm_tuned, grouped_gemm._wgrad_tuned):
    # each config timed faster than the one before: the pick is not simply the first
    tuner._do_bench = lambda kernel_call, quantiles: (timed.append(1), kernel_call(),
                                                      [1.0 / len(timed)] * 3)[2]
    tuner.__dict__.pop("do_bench", None)
x = torch.randn(64, 32, dtype=torch.bfloat16)
offsets = torch.tensor([16, 40, 64], dtype=torch.int32)
grouped_gemm.grouped_mm(x, torch.randn(3, 32, 48, dtype=torch.bfloat16), offsets)
grouped_gemm.grouped_mm_wgrad(x, torch.randn(64, 48, dtype=torch.bfloat16), offsets, False)
picks = [{str(key): str(sorted(config.all_kwargs().items())) for key, config in t.cache.items()}
         for t in (grouped_gemm._grouped_mm_tuned, grouped_gemm._wgrad_tuned)]
print(json.dumps({"timed": len(timed), "compiled": len(check.COMPILED), "picks": picks}))
"""


def test_autotune_picks_kept_for_the_next_process(tmp_path):
    """A second process on the same (stand-in) GPU takes the first one's picks from
    disk (dsv3/kernels/autotune_cache.py): it times nothing and compiles only the
    picked configs; with DSV3_AUTOTUNE_CACHE=0 it tunes again."""
    env = {**ENV, "DSV3_AUTOTUNE_CACHE_DIR": str(tmp_path)}

    def run(**extra):
        result = subprocess.run([sys.executable, "-c", _KEPT_PICKS_SCRIPT], cwd=ROOT,
                                env={**env, **extra}, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout.splitlines()[-1])

    first = run()
    assert first["timed"] >= 12 and len(list(tmp_path.glob("*.json"))) == 2
    second = run()
    assert second["timed"] == 0 and second["compiled"] == 2  # the forward's and wgrad's picks
    assert second["picks"] == first["picks"]
    assert run(DSV3_AUTOTUNE_CACHE="0")["timed"] == first["timed"]
