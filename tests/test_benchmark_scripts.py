"""The benchmark scripts' command lines: ``--help`` describes and does no work, bad
arguments get a readable message, and the command recorded with a result is the one
that ran. Cheap checks only; the benchmarks themselves are not run here."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["checkpointing", "comm_bench", "cpu_kernels", "data_pipeline", "expert_split",
           "gpu_bench", "half_gemm", "memory", "ncu_case", "output_cache", "router_backward", "run",
           "sm90_compile_check", "trainer_overhead", "transformers_bench"]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_script_and_starts_no_work(script):
    result = _run(f"benchmarks.{script}", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
    description = result.stdout.split("\n\n")[1]
    # a whole sentence, not the docstring's first line cut mid-sentence
    assert description.rstrip().endswith((".", ")")), description
    assert "options:" in result.stdout


@pytest.mark.parametrize("bad, message", [(["--dtype", "fp16"], "invalid choice: 'fp16'"),
                                          (["--provider", "foo"], "invalid choice: 'foo'"),
                                          (["--shape", "bad"], "shape must look like")])
def test_memory_rejects_bad_arguments_with_a_message(bad, message):
    good = {"--shape": "T64-D32-F48-E4-K2", "--dtype": "fp32", "--provider": "dsv3"}
    good[bad[0]] = bad[1]
    result = _run("benchmarks.memory", *[x for kv in good.items() for x in kv], timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_memory_surfaces_the_measuring_process_stderr():
    from benchmarks import memory
    with pytest.raises(memory.ChildFailed, match="argument --provider: invalid choice"):
        memory._run_child("--shape", "T64-D32-F48-E4-K2", "--dtype", "fp32", "--provider", "x")


def test_sm90_compile_check_takes_short_and_torch_dtype_names():
    from benchmarks import sm90_compile_check as check
    assert check.parse_dtypes("fp32,bf16,fp16") == [torch.float32, torch.bfloat16,
                                                    torch.float16]
    assert check.parse_dtypes("float32,bfloat16") == [torch.float32, torch.bfloat16]
    assert check.parse_dtypes("bf16,bfloat16") == [torch.bfloat16]
    with pytest.raises(Exception, match="unknown dtype 'fp64'"):
        check.parse_dtypes("fp64")


def test_recorded_command_has_the_options_used(monkeypatch):
    from benchmarks.results import command_line
    assert (command_line("benchmarks.checkpointing", ["--preset", "tiny", "--rounds", "2"])
            == "python -m benchmarks.checkpointing --preset tiny --rounds 2")
    monkeypatch.setattr(sys, "argv", ["/x/trainer_overhead.py", "--steps", "10"])
    assert command_line("benchmarks.trainer_overhead") == (
        "python -m benchmarks.trainer_overhead --steps 10")


def test_appended_section_names_commit_command_and_vector_isa(monkeypatch, tmp_path):
    # The VMs differ in ISA (AVX-512 or AVX2 only) and the kernels are built per ISA: a
    # section without it could not be told apart from another machine's.
    from benchmarks import results
    from benchmarks.run import git_commit
    monkeypatch.setattr(results, "RESULTS_MD", tmp_path / "RESULTS.md")
    results.append_section("A table", "python -m benchmarks.x --y", "| a |")
    text = (tmp_path / "RESULTS.md").read_text()
    heading, machine_line, body = text.strip().split("\n\n")
    assert heading.startswith("## A table, ") and heading.endswith(f"commit {git_commit()}")
    assert machine_line.startswith("`python -m benchmarks.x --y` on ")
    assert f"(CPU capability {torch.backends.cpu.get_cpu_capability()})" in machine_line
    assert body == "| a |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_ncu_case_without_gpu_or_interpreter_says_to_set_triton_interpret():
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.ncu_case", "--smoke"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "TRITON_INTERPRET=1" in result.stderr


def test_layer_providers_are_checked_against_the_reference_loop():
    """`make bench` times dsv3 and the grouped_mm layer only once their output and every
    gradient agree with the reference loop's: here they do, and a provider computing
    something else (the dense FFN, which is no MoE layer) does not pass."""
    import torch

    from benchmarks.bench_checks import disagreement
    from benchmarks.providers import (Shape, make_step, outputs_and_gradients,
                                      reference_outputs, unavailable_reason)
    shape = Shape.parse("T64-D32-F16-E4-K2")
    truth = reference_outputs(shape, torch.float32)
    providers = ["dsv3"] + (["grouped_mm"] if unavailable_reason("grouped_mm", torch.float32)
                            is None else [])
    for provider in providers:
        step = make_step(provider, shape, torch.float32)
        assert disagreement(outputs_and_gradients(step), truth) is None, provider
    dense = outputs_and_gradients(make_step("dense", shape, torch.float32))
    assert disagreement(dense, truth) is not None


def test_a_contended_run_gets_no_verdicts_and_a_verdict_judges_what_it_shows():
    """A contended run printed ✓/✗ on ratios timed under different loads; 1.2504 printed
    "1.25 ✗" against the 1.25 target."""
    from benchmarks import run
    row = {"shape": "T1-D1-F1-E1-K1", "dtype": "fp32", "gflop": 1.0, "dsv3/dense": 1.2504,
           "median_ms": {p: 1.0 for p in run.PROVIDERS},
           "peak_extra_mib": {p: 1.0 for p in run.PROVIDERS},
           "reference/dsv3": 2.0, "grouped_mm/dsv3": 1.5}
    assert "| 1.25 ✓ |" in run.markdown_table([row])
    quiet_row = run.markdown_table([row]).splitlines()[-1]
    contended_row = run.markdown_table([row], contended=True).splitlines()[-1]
    assert "| 1.25 |" in contended_row and "✗" not in contended_row
    assert contended_row.count("✓") == quiet_row.count("✓") - 1  # the memory verdict stays


def test_transformers_bench_checks_its_providers_and_leaves_noise_undecided(monkeypatch):
    """Every provider is checked against eager before any timing (a provider computing
    something else stops the run); a route counts as faster only by more than the
    margin, and a shared run gets no verdicts."""
    from benchmarks import transformers_bench as tb
    tb.check_providers("mixtral")  # they all compute transformers' model
    real_build = tb.build

    def wrong_patch(model_name, dtype, provider):
        model = real_build(model_name, dtype, provider)
        if provider == "patch_moe":
            with torch.no_grad():
                model.model.layers[0].mlp.gate_up_proj.mul_(2)
        return model

    monkeypatch.setattr(tb, "build", wrong_patch)
    with pytest.raises(SystemExit, match="mixtral: patch_moe disagrees with eager"):
        tb.check_providers("mixtral")
    times = {"eager": 1.0, "grouped_mm": 1.0, "batched_mm": 2.0}
    assert tb.verdict({**times, "dsv3": 0.9, "patch_moe": 0.95}) == "✓ both routes"
    assert tb.verdict({**times, "dsv3": 0.9, "patch_moe": 0.99}) == "✓ one route"
    assert tb.verdict({**times, "dsv3": 1.01, "patch_moe": 0.99}) == "≈ (within 3%)"
    assert tb.verdict({**times, "dsv3": 1.1, "patch_moe": 1.2}) == "✗"
    assert tb.verdict({**times, "dsv3": 0.5, "patch_moe": 0.5}, contended=True) == "–"


def test_the_data_pipeline_benchmark_reports_medians_of_its_passes():
    """It timed one pass a chain: one sample each behind its speed-up."""
    from benchmarks.data_pipeline import _median_pass
    passes = [({"a"}, 3.0, 2.0), ({"a"}, 1.0, 9.0), ({"a"}, 2.0, 1.0)]
    assert _median_pass(passes) == ({"a"}, 2.0, 2.0)
    with pytest.raises(AssertionError, match="kept different documents"):
        _median_pass([({"a"}, 1.0, 1.0), ({"b"}, 1.0, 1.0)])


def test_cpu_kernels_times_every_kernel_checked_against_the_reference(capsys):
    from benchmarks import cpu_kernels
    assert cpu_kernels.main(["--shape", "T32-D16-F8-E8-K2", "--rounds", "1", "--calls", "1",
                             "--quantize-log2", "12"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| op ", "|---"))]
    ops = {row[0].lstrip("| ").split(",")[0].split(":")[0].split(" (")[0] for row in rows}
    assert ops == {"route", "route_with_stats", "expert_index", "permute", "unpermute",
                   "swiglu", "gpt_oss_glu", "add_expert_bias", "grouped_mm",
                   "gather_grouped_mm", "quantize_int8", "dequantize_int8"}
    assert {row[1] for row in rows} == {"fp32", "bf16", "int32"}
    assert all(row[-1].rstrip(" |") == "ok" for row in rows), rows


def test_cpu_kernels_row_of_a_wrong_kernel_says_so():
    """A kernel that disagrees with the reference gets FAILED in its row, not a time."""
    import os
    from benchmarks import cpu_kernels
    x = torch.ones(8)

    def call():  # the "kernel" adds 1 where the reference does not
        return x + (os.environ.get("DSV3_BACKEND") != "reference")

    row = cpu_kernels.measure(cpu_kernels.Case("wrong", "fp32", call), rounds=1, calls=1,
                              bandwidth=1e9)
    assert row["check"].startswith("FAILED: output 0: relative error"), row
