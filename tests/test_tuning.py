"""The autotuner's compile threads (dsv3/kernels/tuning.py): how many, from the
environment. That the threads' kernels are the ones timed is checked in
test_sm90_compile.py (sm_90 builds here) and test_grouped_mm.py (on a GPU)."""
import pytest

tuning = pytest.importorskip("dsv3.kernels.tuning")  # triton is optional


@pytest.mark.parametrize("env, expected", [
    ({"DSV3_COMPILE_THREADS": "3"}, 3),
    ({"DSV3_COMPILE_THREADS": "1"}, 1),
    ({}, 16),  # every core
    ({"LOCAL_WORLD_SIZE": "8"}, 2),  # torchrun's ranks of a node share them
    ({"LOCAL_WORLD_SIZE": "32"}, 1),
    ({"DSV3_COMPILE_THREADS": "4", "LOCAL_WORLD_SIZE": "8"}, 4),  # asked for outright
])
def test_compile_threads_from_the_environment(monkeypatch, env, expected):
    monkeypatch.delenv("DSV3_COMPILE_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert tuning._compile_threads() == expected


@pytest.mark.parametrize("value", ["0", "-2", "four", "1.5"])
def test_bad_compile_threads_setting_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("DSV3_COMPILE_THREADS", value)
    with pytest.raises(ValueError, match="DSV3_COMPILE_THREADS"):
        tuning._compile_threads()
