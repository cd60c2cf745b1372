"""The CPU kernels reuse freed large output buffers (csrc/cpu/alloc.h, up to
DSV3_CPU_CACHE_MB, default 512): reuse must never leak old values into a new result,
idle buffers must not pile up beside new ones, and the cache must be releasable. The
limit is read once per process, so these run in a subprocess."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reused_buffers_give_fresh_results_and_release():
    code = textwrap.dedent("""
        import torch, dsv3
        from dsv3 import reference
        h_S2F = torch.randn(2048, 1024)  # a 4 MiB output: large enough for the cache
        first_SF = dsv3.ops.swiglu(h_S2F)
        address, n_bytes = first_SF.data_ptr(), first_SF.numel() * first_SF.element_size()
        del first_SF  # back to the cache
        other_S2F = torch.randn(2048, 1024)
        second_SF = dsv3.ops.swiglu(other_S2F)
        assert second_SF.data_ptr() == address, "the freed buffer was not reused"
        torch.testing.assert_close(second_SF, reference.swiglu(other_S2F))
        del second_SF
        assert dsv3.ops.release_cached_memory() == n_bytes
        assert dsv3.ops.release_cached_memory() == 0
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DSV3_CPU_CACHE_MB": "64"}
    env.pop("DSV3_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def _run(code: str, **env_vars) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_vars}
    env.pop("DSV3_BACKEND", None)
    if "DSV3_CPU_CACHE_MB" not in env_vars:
        env.pop("DSV3_CPU_CACHE_MB", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_cache_is_on_by_default_and_zero_turns_it_off():
    code = """
        import torch, dsv3
        out_SF = dsv3.ops.swiglu(torch.randn(2048, 1024))  # 4 MiB
        del out_SF
        print(dsv3.ops.release_cached_memory())
    """
    assert _run(code) == str(4 << 20)
    assert _run(code, DSV3_CPU_CACHE_MB="0") == "0"


def test_a_request_takes_a_larger_kept_buffer_and_a_miss_unmaps_the_idle_ones():
    """A kept block too small for a request is idle memory: the request that finds
    none large enough unmaps them before mapping its own, so they do not add to the
    peak; a request smaller than a kept block takes it (it is resident anyway)."""
    code = """
        import torch, dsv3
        small = dsv3.ops.swiglu(torch.randn(2048, 1024))  # 4 MiB
        address = small.data_ptr()
        del small
        large = dsv3.ops.swiglu(torch.randn(4096, 1024))  # 8 MiB: the 4 MiB block is unmapped
        del large
        print(dsv3.ops.release_cached_memory())  # the 8 MiB block alone
        large = dsv3.ops.swiglu(torch.randn(4096, 1024))
        address = large.data_ptr()
        del large
        h_S2F = torch.randn(2048, 1024)
        small = dsv3.ops.swiglu(h_S2F)  # takes the 8 MiB block
        print(small.data_ptr() == address,
              torch.allclose(small, dsv3.reference.swiglu(h_S2F), rtol=1e-5, atol=1e-6))
    """
    assert _run(code).split() == [str(8 << 20), "True", "True"]


def test_a_limit_that_is_not_a_whole_number_of_mib_keeps_no_cache_and_says_so():
    """A negative limit was cast to a size near 2^64: a cache without bound. A word
    was 0 without a warning."""
    code = textwrap.dedent("""
        import warnings, torch, dsv3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out_SF = dsv3.ops.swiglu(torch.randn(2048, 1024))
        del out_SF
        print(dsv3.ops.release_cached_memory(), [str(w.message) for w in caught])
    """)
    for value in ("-5", "abc", "12MB", "", " 64 "):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DSV3_CPU_CACHE_MB": value}
        env.pop("DSV3_BACKEND", None)
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        # a Python warning, or c10's line on stderr where no Python handler is set
        said = f"DSV3_CPU_CACHE_MB must be a whole number of MiB >= 0, got '{value}': the " \
               f"CPU kernels keep no freed outputs"
        released = int(result.stdout.split()[0])  # the bytes the cache held
        if value.strip() in ("64", ""):  # spaces around a number: 64 MiB; empty: as unset
            assert released > 0 and "DSV3_CPU_CACHE_MB" not in result.stdout + result.stderr
        else:
            assert released == 0
            assert said in result.stdout + result.stderr, (result.stdout, result.stderr)
