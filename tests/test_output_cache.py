"""The CPU kernels can reuse freed large output buffers (csrc/cpu/alloc.h, opt-in with
DSV3_CPU_CACHE_MB): reuse must never leak old values into a new result, and the cache
must be releasable. The limit is read once per process, so this runs in a subprocess."""
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


def test_cache_is_off_by_default():
    import torch

    import dsv3
    out_SF = dsv3.ops.swiglu(torch.randn(2048, 1024))
    del out_SF
    assert dsv3.ops.release_cached_memory() == 0


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
        if value.strip() == "64":  # a number with spaces around it: a cache of 64 MiB
            assert released > 0 and "DSV3_CPU_CACHE_MB" not in result.stdout + result.stderr
        elif value == "":  # as unset: no cache, no word
            assert released == 0 and "DSV3_CPU_CACHE_MB" not in result.stdout + result.stderr
        else:
            assert released == 0
            assert said in result.stdout + result.stderr, (result.stdout, result.stderr)
