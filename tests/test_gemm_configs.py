"""The grouped GEMMs' autotuner configs, as a GPU's autotuner holds them (whatever runs
here): which launches it weighs for which inputs (short-reduction tiles only for few
rows per expert, the flattened wgrad only where TMA reads x), register caps carried
through config_with, and DSV3_GEMM_VARIANTS=0 keeping the pointer grid launches. No
kernel runs: tests/test_grouped_mm.py launches them."""
import pytest
import torch


def test_wgrad_short_reduction_tiles_tried_only_for_few_rows(monkeypatch):
    """The two-stage wgrad tiles are for experts of few rows (DeepSeek-V3 at 4096 tokens:
    128); from SHORT_REDUCTION_ROWS rows on, the autotuner does not spend time on them."""
    pytest.importorskip("triton")
    from dsv3.kernels import config, grouped_gemm
    monkeypatch.setattr(config, "INTERPRET", False)  # the GPU's configs, whatever runs here
    monkeypatch.setattr(config, "AUTOTUNE", True)
    configs = config.wgrad_configs()

    def kept(rows_per_expert):
        log2 = grouped_gemm._rows_per_expert_log2(rows_per_expert * 32, 32)
        named_args = {"rows_per_expert_log2": log2, "x_desc": None, "dy_desc": None,
                      "x_ptr": torch.empty(0, dtype=torch.bfloat16)}
        return config.prune_wgrad(configs, named_args)

    short = [c for c in configs if c.num_stages == 2]
    assert len(short) == len(config.SHORT_REDUCTION_TILES) > 0
    assert all(c in kept(128) for c in short)
    assert all(c in kept(config.SHORT_REDUCTION_ROWS - 1) for c in short)
    assert not any(c in kept(config.SHORT_REDUCTION_ROWS) for c in short)
    # no descriptors, no TMA configs; the long-reduction tiles stay either way
    assert not any(c.kwargs["USE_TMA"] for c in kept(128))
    assert len(kept(4096)) == len([c for c in configs if not c.kwargs["USE_TMA"]]) - len(short)


def test_wgrad_flattened_walk_tried_only_where_tma_reads_x(monkeypatch):
    """The flattened wgrad reads x and dy through descriptors it builds on the device:
    the autotuner weighs it (persistent TMA launches of 128-row tiles) only where x has
    a host descriptor too, i.e. is TMA-readable and not gathered."""
    pytest.importorskip("triton")
    from dsv3.kernels import config
    monkeypatch.setattr(config, "INTERPRET", False)
    monkeypatch.setattr(config, "AUTOTUNE", True)
    configs = config.wgrad_configs()
    flat = [c for c in configs if c.kwargs["FLATTEN"]]
    assert flat and all(c.kwargs["PERSISTENT"] and c.kwargs["USE_TMA"]
                        and c.kwargs["BLOCK_M"] == 128 for c in flat)

    def kept(x_desc):
        named_args = {"rows_per_expert_log2": 12, "x_desc": x_desc, "dy_desc": object(),
                      "x_ptr": torch.empty(0, dtype=torch.bfloat16)}
        return config.prune_wgrad(configs, named_args)

    assert all(c in kept(object()) for c in flat)
    assert not any(c.kwargs["FLATTEN"] for c in kept(None))
    assert any(c.kwargs["USE_TMA"] for c in kept(None))  # dy alone still through TMA


def test_config_with_keeps_a_register_cap_unless_told():
    """config.config_with carries a config's register cap (the flattened 128x128 wgrad's)
    to what it derives, replaces it when given one, and clears it with None."""
    triton = pytest.importorskip("triton")
    from dsv3.kernels import config
    capped = triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3, maxnreg=128)
    assert config.config_with(capped, FLATTEN=False).maxnreg == 128
    assert config.config_with(capped, maxnreg=96).maxnreg == 96
    assert config.config_with(capped, maxnreg=None).maxnreg is None
    assert config.config_with(triton.Config({"BLOCK_M": 64})).maxnreg is None


def test_gemm_variants_switch_keeps_the_pointer_grid_launches(monkeypatch):
    """DSV3_GEMM_VARIANTS=0 (config.VARIANTS): the GPU's configs without the TMA and
    persistent launches and the flattened forward loops, every tile kept; gpu_check.sh
    falls back to it after a benchmark loses the CUDA context."""
    pytest.importorskip("triton")
    from dsv3.kernels import config
    monkeypatch.setattr(config, "INTERPRET", False)
    monkeypatch.setattr(config, "AUTOTUNE", True)
    all_forward, all_wgrad = config.matmul_configs(), config.wgrad_configs()
    assert any(c.kwargs["USE_TMA"] for c in all_forward)
    assert any(c.kwargs["FLATTEN"] for c in all_forward)
    assert any(c.kwargs["PERSISTENT"] for c in all_wgrad)
    assert any(c.kwargs["FLATTEN"] for c in all_wgrad)
    monkeypatch.setattr(config, "VARIANTS", False)
    forward, wgrad = config.matmul_configs(), config.wgrad_configs()
    assert forward == [c for c in all_forward if not (c.kwargs["USE_TMA"] or c.kwargs["FLATTEN"])]
    assert wgrad == [c for c in all_wgrad
                     if not (c.kwargs["USE_TMA"] or c.kwargs["PERSISTENT"] or c.kwargs["FLATTEN"])]
    assert len(wgrad) == len(config._tiles()) + len(config.SHORT_REDUCTION_TILES)


@pytest.mark.parametrize("dtype, precision, flat_fwd_kept", [
    (torch.bfloat16, "ieee", True), (torch.float32, "ieee", True),
    (torch.float32, "tf32", False)])
def test_configs_that_overflow_shared_memory_are_not_launched(monkeypatch, dtype, precision,
                                                              flat_fwd_kept):
    """The flattened fp32 forward under TF32 (128x128x64, 3 stages) needs 262,144 B of
    shared memory on sm_90 (compiled with Triton 3.6), past the 232,448 an SM has: the
    pipeline-only estimate kept it, and the autotuner paid a compile and a failed
    launch per new shape. Every config the compile check measured below the limit stays."""
    pytest.importorskip("triton")
    from dsv3.kernels import config
    monkeypatch.setattr(config, "INTERPRET", False)
    monkeypatch.setattr(config, "AUTOTUNE", True)
    forward = config.matmul_configs()
    named_args = {"w_desc": object(), "x_ptr": torch.empty(0, dtype=dtype)}
    kept = config.prune_matmul(forward, named_args, PRECISION=precision)
    flat_128 = [c for c in forward if c.kwargs["FLATTEN"] and c.kwargs["BLOCK_N"] == 128
                and not c.kwargs["USE_TMA"]]
    assert flat_128 and all((c in kept) == flat_fwd_kept for c in flat_128)
    if dtype == torch.bfloat16:  # every bf16 config fits (the largest measured: 196,608 B)
        assert kept == forward
