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


def stand_in_tuner(configs):
    """What autotune_cache reads of an Autotuner: its kernel, key, configs and cache."""
    from types import SimpleNamespace
    kernel = SimpleNamespace(cache_key="source-hash", __name__="_kernel")
    return SimpleNamespace(fn=kernel, keys=["DIM_X", "GATHER"], configs=configs, cache={})


def configs(*blocks):
    import triton
    return [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=3) for m in blocks]


def test_autotune_picks_survive_the_process(tmp_path, monkeypatch):
    """Saved picks load back as the same key tuples and configs (bools and dtype
    strings in the key included); a pick whose config is gone is dropped."""
    from dsv3.kernels import autotune_cache
    monkeypatch.setenv("DSV3_AUTOTUNE_CACHE_DIR", str(tmp_path / "picks"))
    tuner = stand_in_tuner(configs(64, 128, 256))
    tuner.cache = {(4096, True, "torch.bfloat16"): tuner.configs[2],
                   (2048, False, "torch.float16"): tuner.configs[0]}
    path = autotune_cache.store_path(tuner, "H200 sm_90")
    assert path.parent == tmp_path / "picks"
    autotune_cache.save(tuner, path)
    fresh = stand_in_tuner(configs(64, 128, 256))
    assert autotune_cache.load(fresh, path) == {(4096, True, "torch.bfloat16"): fresh.configs[2],
                                                (2048, False, "torch.float16"): fresh.configs[0]}
    assert autotune_cache.load(stand_in_tuner(configs(64)), path) == {
        (2048, False, "torch.float16"): configs(64)[0]}
    assert autotune_cache.load(fresh, tmp_path / "absent.json") == {}


def test_autotune_picks_file_is_named_by_all_a_pick_depends_on():
    from dsv3.kernels import autotune_cache
    tuner = stand_in_tuner(configs(64, 128))
    path = autotune_cache.store_path(tuner, "H200 sm_90")
    assert path == autotune_cache.store_path(stand_in_tuner(configs(64, 128)), "H200 sm_90")
    assert path != autotune_cache.store_path(tuner, "H100 sm_90")
    assert path != autotune_cache.store_path(stand_in_tuner(configs(64, 256)), "H200 sm_90")
    other_source = stand_in_tuner(configs(64, 128))
    other_source.fn.cache_key = "edited-source-hash"
    assert path != autotune_cache.store_path(other_source, "H200 sm_90")


def test_unreadable_or_unwritable_picks_cost_a_retune_not_a_crash(tmp_path):
    from dsv3.kernels import autotune_cache
    tuner = stand_in_tuner(configs(64, 128))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the autotune picks"):
        assert autotune_cache.load(tuner, corrupt) == {}
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    tuner.cache = {(1,): tuner.configs[0]}
    with pytest.warns(UserWarning, match="could not keep the autotune picks"):
        autotune_cache.save(tuner, blocked / "picks.json")  # its folder is a file


def test_processes_saving_picks_keep_each_others(tmp_path, monkeypatch):
    """Ranks tune different keys (expert parallelism: different rows per expert) and
    save to one file: each save merges, so a restart finds all of them."""
    from dsv3.kernels import autotune_cache
    monkeypatch.setenv("DSV3_AUTOTUNE_CACHE_DIR", str(tmp_path))
    rank_a, rank_b = stand_in_tuner(configs(64, 128)), stand_in_tuner(configs(64, 128))
    path = autotune_cache.store_path(rank_a, "H200 sm_90")
    rank_a.cache = {(1024,): rank_a.configs[0]}
    rank_b.cache = {(2048,): rank_b.configs[1]}
    autotune_cache.save(rank_a, path)
    autotune_cache.save(rank_b, path)
    restarted = stand_in_tuner(configs(64, 128))
    assert autotune_cache.load(restarted, path) == {(1024,): restarted.configs[0],
                                                    (2048,): restarted.configs[1]}
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [path.name]


def test_picks_not_kept_off_the_gpu_when_off_or_without_a_home(monkeypatch):
    import torch

    from dsv3.kernels import autotune_cache
    tuner = stand_in_tuner(configs(64, 128))
    on_gpu = "H200 sm_90"
    monkeypatch.delenv("DSV3_AUTOTUNE_CACHE_DIR", raising=False)
    monkeypatch.setattr(autotune_cache, "ENABLED", False)
    assert autotune_cache.store_for(tuner, on_gpu) is None
    monkeypatch.setattr(autotune_cache, "ENABLED", True)
    assert autotune_cache.store_for(tuner, on_gpu) is not None
    assert autotune_cache.store_for(tuner, None) is None  # off the GPU

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(autotune_cache.Path, "home", staticmethod(no_home))
    with pytest.warns(UserWarning, match="DSV3_AUTOTUNE_CACHE_DIR"):
        assert autotune_cache.store_for(tuner, on_gpu) is None
    monkeypatch.undo()
    assert autotune_cache.device_name({"x_ptr": torch.empty(0)}) is None  # CPU tensors


def test_every_tuner_keys_only_its_kernels_arguments():
    """Triton 3.9's Autotuner rejects a key name that is not an argument of its kernel
    (3.6-3.8 skip it), so a shared key list would fail at import there."""
    from dsv3.kernels import grouped_gemm
    for tuner in (grouped_gemm._grouped_mm_tuned, grouped_gemm._wgrad_tuned):
        assert set(tuner.keys) <= set(tuner.fn.arg_names), tuner.fn.__name__
    assert "W_KMAJOR" in grouped_gemm._grouped_mm_tuned.keys  # the forward still keys on it


def test_a_config_that_fails_unexpectedly_is_timed_out_not_raised(monkeypatch):
    """Triton's timing forgives only out-of-resources and compile-time failures; any
    other error of one config (a TMA launch some driver rejects) would fail the op's
    first call. It is left out instead, with a warning naming it."""
    import triton
    from triton.runtime.autotuner import Autotuner

    from dsv3.kernels import grouped_gemm
    good, bad = (triton.Config({"BLOCK_M": m}) for m in (64, 128))

    def parent_bench(self, *args, config, **meta):
        if config is bad:
            raise RuntimeError("cuTensorMapEncodeTiled failed")
        return [1.0, 0.9, 1.1]

    monkeypatch.setattr(Autotuner, "_bench", parent_bench)
    tuner = grouped_gemm._wgrad_tuner([good, bad])
    assert tuner._bench(config=good) == [1.0, 0.9, 1.1]
    with pytest.warns(RuntimeWarning, match="BLOCK_M: 128.*cuTensorMapEncodeTiled"):
        assert tuner._bench(config=bad) == [float("inf")] * 3


def test_picks_are_kept_per_gpu_model(tmp_path, monkeypatch):
    """Triton's key holds no device: in a process driving two GPU models, one's pick
    (e.g. a config using an H200's 196 KB of shared memory) was reused on the other.
    Each model now has its own picks, loaded from its own file on its first launch."""
    import triton

    from dsv3.kernels import autotune_cache, grouped_gemm
    monkeypatch.setenv("DSV3_AUTOTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune_cache, "ENABLED", True)
    small, big = (triton.Config({"BLOCK_M": m}) for m in (64, 256))
    stored = grouped_gemm._wgrad_tuner([small, big])
    stored.cache = {(4096,): big}
    autotune_cache.save(stored, autotune_cache.store_path(stored, "H200 sm_90"))

    tuner = grouped_gemm._wgrad_tuner([small, big])
    tuner.use_picks_of("H200 sm_90")
    assert tuner.cache == {(4096,): big}  # loaded from the H200's file
    tuner.use_picks_of("A100 sm_80")
    assert tuner.cache == {}  # the H200's pick is not the A100's
    tuner.cache[(4096,)] = small  # what Triton's run records after timing
    tuner.use_picks_of("H200 sm_90")
    assert tuner.cache == {(4096,): big}
    tuner.use_picks_of("A100 sm_80")
    assert tuner.cache == {(4096,): small}
    assert tuner.store == autotune_cache.store_path(tuner, "A100 sm_80")
    tuner.use_picks_of(None)  # CPU tensors (the interpreter): nothing stored
    assert tuner.cache == {} and tuner.store is None


def test_threads_driving_two_gpu_models_launch_their_own_picks(monkeypatch):
    """nn.DataParallel-like: two threads launch one tuned kernel, each for its own GPU
    model. Triton's run reads the picks after the switch to the thread's model; without
    a lock another thread could switch in between (~10% of launches used the other
    model's pick)."""
    import sys
    import threading
    import time

    import triton

    from dsv3.kernels import autotune_cache, grouped_gemm
    monkeypatch.setattr(autotune_cache, "ENABLED", False)
    small, big = (triton.Config({"BLOCK_M": m}) for m in (64, 256))
    tuner = grouped_gemm._wgrad_tuner([small, big])
    pick = {"H200": big, "A100": small}
    local = threading.local()
    monkeypatch.setattr(autotune_cache, "device_name", lambda named_args: local.device)
    args = [0] * len(tuner.arg_names)
    key = tuple(args[tuner.arg_names.index(name)] for name in tuner.keys)
    for device, config in pick.items():  # both already tuned (e.g. loaded from their files)
        tuner.use_picks_of(device)
        tuner.cache[key] = config

    class LaunchRecorder:  # stands in for the kernel: records the config it was given
        def run(self, *args, **kwargs):
            local.used = kwargs["BLOCK_M"]

    monkeypatch.setattr(tuner, "fn", LaunchRecorder())
    wrong = {device: 0 for device in pick}

    def launch_for(device):
        local.device = device
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            tuner.run(*args, grid=(1,), warmup=False)
            wrong[device] += local.used != pick[device].kwargs["BLOCK_M"]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=launch_for, args=(d,)) for d in pick]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == {"H200": 0, "A100": 0}
