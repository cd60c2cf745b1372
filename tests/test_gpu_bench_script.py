"""benchmarks/gpu_bench.py runs only on a lent GPU, minutes per session: its
``--smoke`` mode runs every case on tiny CPU tensors here, so a broken case is
found in CI and not on the GPU's clock."""
import json

import pytest

from benchmarks import gpu_bench, op_profile


def test_every_gpu_benchmark_case_runs_and_agrees_with_its_peer(tmp_path):
    gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    benches = {row["bench"] for row in rows}
    assert {"grouped_mm fwd", "grouped_mm dgrad", "grouped_mm wgrad", "permute", "unpermute",
            "layer fwd+bwd", "quantize_int8 (error feedback)"} <= benches
    assert [row for row in rows if "error" in row] == []
    figures = [row for row in rows if "op" not in row]
    for row in figures:
        assert row["dsv3_ms"] > 0
        assert row["check"] == "ok", row  # what it timed, against the reference or the peer
        # bf16 against the peer's bf16: rounding only (the layer may route a near-tie apart).
        assert row.get("rel_err", 0.0) < 2e-2, row
    # Each profiled step: its longest ops, the rest in one row, and a total that adds up.
    profiles = [row for row in rows if "op" in row]
    assert {row["bench"] for row in profiles} == {"device time by op, dsv3 layer fwd+bwd",
                                                  "device time by op, _grouped_mm layer fwd+bwd"}
    totals = [row for row in profiles if row["op"] == "(total)"]
    assert len(totals) == 2 * len(gpu_bench.LAYER_SHAPES)
    for total in totals:
        parts = [row for row in profiles if (row["bench"], row["shape"]) ==
                 (total["bench"], total["shape"]) and row is not total]
        assert 0 < len(parts) <= op_profile.PROFILE_TOP + 1
        assert sum(row["ms_per_step"] for row in parts) == pytest.approx(total["ms_per_step"])
    # two tables, each with a header and a rule
    assert (tmp_path / "gpu_bench.md").read_text().count("\n|") == len(rows) + 4


def test_a_case_that_computes_a_wrong_result_fails_the_run(tmp_path, monkeypatch, capsys):
    """Run 4 timed a router whose per-expert counts were wrong and wrote its rows as
    figures. The router rows now check their outputs against the reference: counts
    off as run 4's were fail the row and the run (WRONG_RESULT), the others stand."""
    import dsv3

    real_route = dsv3.ops.route

    def counts_off(*args, **kwargs):
        weights_TK, experts_TK, counts_E = real_route(*args, **kwargs)
        if backend.selected_backend() == "reference":
            return weights_TK, experts_TK, counts_E
        return weights_TK, experts_TK, counts_E.roll(1)  # the right total, misplaced

    from dsv3.ops import backend
    monkeypatch.setattr(dsv3.ops, "route", counts_off)
    monkeypatch.setattr(gpu_bench, "jobs", lambda: [("memory", gpu_bench.memory_rows, ())])
    with pytest.raises(SystemExit) as exited:
        gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    assert exited.value.code == gpu_bench.WRONG_RESULT
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    checks = {row["bench"]: row["check"] for row in rows}
    assert checks["route (sigmoid, 8 groups)"].startswith("FAILED: output 2: relative error")
    assert checks["route (softmax, Mixtral-like)"].startswith("FAILED: output 2")
    assert checks["permute"] == checks["unpermute backward"] == "ok"
    assert "Computed a wrong result" in capsys.readouterr().err


def test_a_bandwidth_case_that_raises_loses_only_its_own_row(tmp_path, monkeypatch):
    """The bandwidth-bound cases are one job: a case that raised (a variant that does not
    compile on the GPU's Triton) dropped every other case's row with it."""
    import dsv3

    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel\nsecond line")

    monkeypatch.setattr(dsv3.ops, "swiglu", broken)
    monkeypatch.setattr(gpu_bench, "jobs", lambda: [("memory", gpu_bench.memory_rows, ())])
    gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    rows = {row["bench"]: row for row in
            json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]}
    # the backward's check runs the op forward too
    failed = {name for name, row in rows.items() if "error" in row}
    assert failed == {"swiglu", "swiglu backward"}
    assert rows["swiglu"]["error"] == "RuntimeError: no such kernel"
    assert "dsv3_ms" not in rows["swiglu"]
    assert len(rows) > 10 and all(row["check"] == "ok" for name, row in rows.items()
                                  if name not in failed)


def test_the_gpt_oss_row_checks_the_experts_gradients(monkeypatch):
    """The GPT-OSS row checked the experts' forward only: a wrong backward was timed
    as a figure. Now a gradient off by 10% fails the row."""
    import torch

    import dsv3.integrations.transformers.gpt_oss as gpt_oss

    class WrongGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y_TD):
            return y_TD.clone()

        @staticmethod
        def backward(ctx, grad_TD):
            return grad_TD * 1.1

    real_forward = gpt_oss.experts_forward
    monkeypatch.setattr(gpt_oss, "experts_forward",
                        lambda *args: WrongGradient.apply(real_forward(*args)))
    monkeypatch.setattr(gpu_bench, "DEVICE", gpu_bench.DEVICE)  # use_smoke_sizes sets them
    for name in ("GEMM_SHAPES", "LAYER_SHAPES", "GPT_OSS_SHAPES", "COPY_BYTES"):
        monkeypatch.setattr(gpu_bench, name, getattr(gpu_bench, name))
    monkeypatch.setattr(gpu_bench, "MEMORY_SHAPE", dict(gpu_bench.MEMORY_SHAPE))
    gpu_bench.use_smoke_sizes()
    [row] = gpu_bench.gpt_oss_rows(*gpu_bench.GPT_OSS_SHAPES[0])
    assert row["check"].startswith("FAILED: experts against the peer's: output 1: relative "
                                   "error 0.1"), row


def test_the_checks_compare_what_they_should():
    """bench_checks' tolerances: rounding passes, a wrong kernel does not."""
    import torch

    from benchmarks.bench_checks import disagreement
    x = torch.randn(1000)
    assert disagreement(x, x * (1 + 1e-3)) is None
    assert disagreement(x, x.flip(0)).startswith("output 0: relative error")
    ids = torch.randint(0, 64, (1000,))
    assert disagreement(ids, ids) is None and disagreement(ids, ids.roll(1)) is not None
    nan = torch.tensor([1.0, float("nan")])
    assert disagreement(nan, nan.clone()) is None
    assert disagreement(nan, torch.tensor([1.0, 2.0])).startswith("output 0: NaN")
    assert disagreement((x, None), (x,)) == "2 outputs against the reference's 1"
    # an inf in the reference made the norm inf and every error 0: all passed
    inf = float("inf")
    assert disagreement(torch.tensor([inf, 100.0, -50.0]), torch.tensor([inf, 1.0, 2.0])) \
        .startswith("output 0: relative error")
    assert disagreement(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.0])) is None
    assert disagreement(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0])) \
        .startswith("output 0: +inf")
    assert disagreement(ids.int(), ids.float()).startswith("output 0: dtype torch.int32")


def test_tuned_choice_names_the_variant_and_its_margin():
    """The GEMM rows say which variant the autotuner picked: read from the tuner only on
    the GPU, so checked here on a stand-in with the Autotuner's fields."""
    from types import SimpleNamespace

    import triton

    def config(**flags):
        return triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, **flags},
                             num_warps=8, num_stages=3)

    plain, tma = config(USE_TMA=False), config(USE_TMA=True)
    forward = SimpleNamespace(configs=[plain, tma], cache={("key",): tma}, best_config=tma,
                              configs_timings={plain: [2.0, 1.9, 2.1], tma: [1.5, 1.4, 1.6]})
    assert gpu_bench.tuned_choice(forward, 0, ("USE_TMA",)) == {
        "config": "tma 128x128x64 w8 s3", "tma_over_pointer": 0.75}
    assert gpu_bench.tuned_choice(forward, 1, ("USE_TMA",)) == {
        "config": "tma 128x128x64 w8 s3 (reused)"}
    # The wgrad's three flags, each weighed over the configs with and without it (the
    # flattened walk is a persistent TMA launch only).
    launches = {(p, t, False): config(PERSISTENT=p, USE_TMA=t, FLATTEN=False)
                for p in (False, True) for t in (False, True)}
    launches[True, True, True] = config(PERSISTENT=True, USE_TMA=True, FLATTEN=True)
    times = {(False, False, False): 4.0, (True, False, False): 3.0, (False, True, False): 2.5,
             (True, True, False): 2.0, (True, True, True): 1.8}
    wgrad = SimpleNamespace(configs=list(launches.values()), cache={("key",): None},
                            best_config=launches[True, True, True],
                            configs_timings={launches[k]: [t] for k, t in times.items()})
    assert gpu_bench.tuned_choice(wgrad, 0, gpu_bench.WGRAD_FLAGS) == {
        "config": "persistent tma flat 128x128x64 w8 s3", "persistent_over_grid": 1.8 / 2.5,
        "tma_over_pointer": 1.8 / 3.0, "flat_over_nested": 1.8 / 2.0}


def test_autotune_picks_list_every_tuned_key(monkeypatch):
    """After the cases, gpu_bench lists each key the GEMM tuners settled (the layers'
    own included): read from the tuners only on the GPU, so checked on stand-ins."""
    from types import SimpleNamespace

    import triton

    def config(**flags):
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, **flags},
                             num_warps=4, num_stages=2)

    keys = ["DIM_X", "DIM_Y", "rows_per_expert_log2", "GATHER", "W_KMAJOR"]
    tma, pointer = config(USE_TMA=True), config(USE_TMA=False)
    forward_key = (4096, 28672, 12, True, True, "torch.bfloat16")
    forward = SimpleNamespace(keys=keys, arg_names=keys, cache={forward_key: tma}, timings={
        forward_key: {pointer: [0.9, 0.8, 1.0], tma: [0.7, 0.6, 0.8]}})
    wgrad = SimpleNamespace(keys=keys, arg_names=keys[:4], cache={
        (7168, 4096, 8, False, "torch.bfloat16"): config(PERSISTENT=False, USE_TMA=False)})
    monkeypatch.setattr(gpu_bench.grouped_gemm, "_grouped_mm_tuned", forward)
    monkeypatch.setattr(gpu_bench.grouped_gemm, "_wgrad_tuned", wgrad)
    assert gpu_bench.autotune_picks() == [
        {"bench": "autotune pick, forward/dgrad",
         "shape": "DIM_X=4096 DIM_Y=28672 rows_per_expert_log2=12 GATHER=True W_KMAJOR=True",
         "config": "nested tma 64x128x64 w4 s2",  # a config without FLATTEN: nested
         "timings_ms": {"nested tma 64x128x64 w4 s2": 0.7,
                        "nested pointer 64x128x64 w4 s2": 0.9}},
        {"bench": "autotune pick, wgrad",
         "shape": "DIM_X=7168 DIM_Y=4096 rows_per_expert_log2=8 GATHER=False",
         "config": "grid pointer nested 64x128x64 w4 s2"}]


def test_a_lost_cuda_context_stops_the_run_and_resume_runs_the_cases_left(tmp_path, monkeypatch):
    """A case that loses the CUDA context ends the run with status CUDA_LOST, its rows
    saved; gpu_check.sh then resumes without the GEMM variants. The resumed run keeps
    the rows, skips the cases done, tries the lost case and the failed one once more
    (under the other variants) and, were it lost again, a third run would skip it."""
    from dsv3.kernels import config

    calls = []

    def case(name, error=None):
        def run(shape):
            calls.append(name)
            if error:
                raise RuntimeError(error)
            return [{"bench": name, "shape": shape, "dsv3_ms": 1.0}]
        return run

    def stop():  # os._exit in the real run
        raise SystemExit(gpu_bench.CUDA_LOST)

    lost = {"crashes"}
    monkeypatch.setattr(gpu_bench, "jobs", lambda: [
        (name, case(name, error), ("s",)) for name, error in [
            ("first", None), ("fails", "a shape the peer rejects"),
            ("crashes", "CUDA error: an illegal memory access was encountered"), ("last", None)]])
    monkeypatch.setattr(gpu_bench, "cuda_lost", lambda: calls[-1] in lost)
    monkeypatch.setattr(gpu_bench, "stop_for_lost_context", stop)
    out = ["--smoke", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        gpu_bench.main(out)
    assert stopped.value.code == gpu_bench.CUDA_LOST
    assert calls == ["first", "fails", "crashes"]
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["done"] == ["first"]
    assert saved["failed"] == ["fails (on)"] and saved["lost"] == ["crashes (on)"]
    assert "illegal memory access" in saved["rows"][-1]["error"]

    monkeypatch.setattr(config, "VARIANTS", False)
    calls.clear()
    with pytest.raises(SystemExit):  # lost again, now without the variants
        gpu_bench.main(out + ["--resume"])
    assert calls == ["fails", "crashes"]
    calls.clear()
    gpu_bench.main(out + ["--resume"])
    assert calls == ["last"]
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    assert [(row["bench"], row.get("variants"), "error" in row) for row in rows] == [
        ("first", None, False), ("fails", None, True), ("crashes", None, True),
        ("fails", "off", True), ("crashes", "off", True), ("last", "off", False)]
    assert "| variants |" in (tmp_path / "gpu_bench.md").read_text()


def test_a_run_cut_short_leaves_its_files_and_says_where(tmp_path, monkeypatch):
    """gpu_check.sh stops gpu_bench with SIGINT at its limit. The JSON and markdown
    were written only once the first case (every bandwidth-bound kernel) finished, so
    a run cut or hung there left neither; now they hold the header from the start, and
    an interrupted case is a row saying so."""
    seen = []

    def first(shape):
        seen.append(all((tmp_path / name).is_file() for name in ("gpu_bench.json", "gpu_bench.md")))
        return [{"bench": "first", "shape": shape, "dsv3_ms": 1.0}]

    def cut(shape):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_bench, "jobs", lambda: [("first", first, ("s",)), ("cut", cut, ("s",)),
                                                    ("never", first, ("s",))])
    with pytest.raises(KeyboardInterrupt):
        gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    assert seen == [True]
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [(row["bench"], row.get("error")) for row in saved["rows"]] == [
        ("first", None), ("cut", "stopped at the time limit")]
    assert saved["done"] == ["first"]
    assert "stopped at the time limit" in (tmp_path / "gpu_bench.md").read_text()


def test_gpu_check_resumes_the_benchmarks_once_the_cuda_context_is_lost(tmp_path):
    """gpu_check.sh's own steps, with a stand-in python3 that logs each call: the
    benchmark run that exits CUDA_LOST is followed by a --resume run without the GEMM
    variants, and the script still fails, so the lost case is not missed."""
    import os
    import subprocess
    from pathlib import Path

    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f"""#!/usr/bin/env bash
echo "$* variants=${{DSV3_GEMM_VARIANTS:-on}}" >> {log}
case "$*" in
  *"-m pytest"*) echo "pytest failure_log=$DSV3_FAILURE_LOG" >> {log}; exit 0 ;;
  *benchmarks.gpu_bench*--resume*) echo "| table |" > "$OUT/gpu_bench.md"; exit 0 ;;
  *benchmarks.gpu_bench*) exit {gpu_bench.CUDA_LOST} ;;
esac
""")
    fake.chmod(0o755)
    ncu = fake.with_name("ncu")  # Nsight Compute: the last phase profiles under it
    ncu.write_text(f"""#!/usr/bin/env bash
echo "ncu $*" >> {log}
""")
    ncu.chmod(0o755)
    script = Path(gpu_bench.__file__).with_name("gpu_check.sh")
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}",
           "OUT": str(tmp_path / "out"), "CUDA_HOME": str(tmp_path), "TOTAL_S": "500"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)
    bench_calls = [line for line in log.read_text().splitlines() if "gpu_bench" in line]
    assert len(bench_calls) == 2, done.stdout
    assert "--resume" not in bench_calls[0] and bench_calls[0].endswith("variants=on")
    assert "--resume" in bench_calls[1] and bench_calls[1].endswith("variants=0")
    assert "| table |" in done.stdout
    assert done.returncode == 1 and "status 1" in done.stdout
    calls = log.read_text().splitlines()
    # the benchmarks first: the tests take the time left after them
    pytest_call = next(i for i, line in enumerate(calls) if line.startswith("pytest "))
    assert calls.index(bench_calls[1]) < pytest_call
    assert calls[pytest_call].endswith("out/pytest_failures.txt")
    ncu_calls = [line for line in log.read_text().splitlines() if line.startswith("ncu ")]
    assert len(ncu_calls) == 1 and "--clock-control none" in ncu_calls[0]
    assert ncu_calls[0].endswith("python3 -m benchmarks.ncu_case")


def test_gpu_check_stops_pytest_so_that_it_still_reports(tmp_path):
    """A cold GPU test phase runs past its limit; stopped by SIGTERM, pytest printed
    nothing more, so the log lacked its counts and the 30 slowest tests the script
    promises. Stopped by SIGINT it prints them; here a stand-in pytest that reports only
    on SIGINT, at the smallest TOTAL_S (the tests' 30 s floor)."""
    import os
    import subprocess
    import time
    from pathlib import Path

    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("""#!/usr/bin/env bash
case "$*" in
  *"-m pytest"*) trap 'echo "== slowest 30 durations =="; echo "3 passed (interrupted)"; exit 2' INT
                 sleep 300 & wait ;;
esac
exit 0
""")
    fake.chmod(0o755)
    script = Path(gpu_bench.__file__).with_name("gpu_check.sh")
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}",
           "OUT": str(tmp_path / "out"), "CUDA_HOME": str(tmp_path), "TOTAL_S": "40"}
    start = time.monotonic()
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - start < 40 + 5, done.stdout
    log = (tmp_path / "out" / "pytest_gpu.log").read_text()
    assert "slowest 30 durations" in log and "3 passed (interrupted)" in log
    assert done.returncode == 1 and "status 1" in done.stdout


def test_ncu_case_runs_every_launch(tmp_path):
    """benchmarks/ncu_case.py, which gpu_check.sh runs under Nsight Compute, on tiny CPU
    tensors through Triton's interpreter (its --smoke mode)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    from benchmarks import ncu_case
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.ncu_case", "--smoke"], env=env,
                          cwd=Path(gpu_bench.__file__).parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = [line for line in done.stdout.splitlines() if line.startswith("ran ")]
    assert [line.split(":")[0].removeprefix("ran ") for line in ran] == list(ncu_case.launches())
    assert all(line.endswith("finite True") for line in ran)


def test_gpu_check_runs_every_test_file_with_gpu_cases():
    """gpu_check.sh names its test files; one with CUDA cases that it leaves out would
    never run on a GPU (CI skips them), and nothing would say so."""
    import re
    from pathlib import Path

    tests = Path(__file__).parent
    with_gpu_cases = {path.name for path in tests.glob("test_*.py")
                      if re.search(r"mark\.gpu|\bDEVICES\b", path.read_text())}
    script = (tests.parent / "benchmarks" / "gpu_check.sh").read_text()
    listed = set(re.findall(r"tests/(test_\w+\.py)", script.split("tests=(", 1)[1].split(")")[0]))
    assert with_gpu_cases, "the pattern no longer finds the GPU-marked test files"
    assert with_gpu_cases <= listed, f"not run by gpu_check.sh: {sorted(with_gpu_cases - listed)}"


def test_failure_log_gets_each_failure_as_it_happens(tmp_path, monkeypatch):
    """tests/conftest.py appends each failed report to DSV3_FAILURE_LOG (gpu_check.sh
    stops pytest at its time limit, before any summary), once under xdist, and nothing
    without it."""
    from types import SimpleNamespace

    import conftest
    report = SimpleNamespace(failed=True, nodeid="tests/test_x.py::test_y[cuda]", when="call",
                             longreprtext="AssertionError: output 2 differs")
    monkeypatch.delenv("DSV3_FAILURE_LOG", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # as in the controller
    conftest.pytest_runtest_logreport(report)  # no log asked for: nothing written
    log = tmp_path / "failures.txt"
    monkeypatch.setenv("DSV3_FAILURE_LOG", str(log))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, nodeid="passed"))
    with monkeypatch.context() as worker:  # an xdist worker leaves it to the controller
        worker.setenv("PYTEST_XDIST_WORKER", "gw0")
        conftest.pytest_runtest_logreport(report)
    conftest.pytest_runtest_logreport(report)
    assert log.read_text() == ("==== tests/test_x.py::test_y[cuda] [call]\n"
                               "AssertionError: output 2 differs\n")


def test_the_smoke_run_as_gpu_check_starts_it(tmp_path):
    """gpu_check.sh runs `python -m benchmarks.gpu_bench`: the module is then __main__,
    and a case module that imported benchmarks.gpu_bench got a second copy, without
    --smoke's settings (the bandwidth cases asked for a GPU). Run it that way."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", "--smoke", "--out",
                           str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    assert [row for row in rows if "error" in row] == []
    assert any(row["bench"] == "permute" and row["check"] == "ok" for row in rows)
