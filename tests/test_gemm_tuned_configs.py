"""Every grouped-GEMM config the GPU's autotuner may pick, launched as it holds it
(tiles, stages, register caps, loads, walks) against a per-expert loop, on a GPU. The
GPU pass runs the tests with DSV3_AUTOTUNE=0, which keeps each GEMM to one config, and
test_grouped_mm.py's variant tests launch the first tile only; these cover the rest.
A file of its own so that benchmarks/gpu_check.sh can run it last: it compiles dozens
of kernels, and a test phase cut short should lose these before the broader tests."""
import pytest
import torch

from test_grouped_mm import (EVEN_COUNTS_E, VARIANT_COUNTS_E, check_forward_variant,
                             check_wgrad_variant, triton_grouped_gemm)


def tuned_configs(config, monkeypatch, configs_of: str) -> list:
    """The configs the GPU's autotuner holds, as it holds them (tiles, stages, register
    caps), whatever DSV3_AUTOTUNE and DSV3_GEMM_VARIANTS say."""
    monkeypatch.setattr(config, "AUTOTUNE", True)
    monkeypatch.setattr(config, "VARIANTS", True)
    return getattr(config, configs_of)()


def tuned_flattened_configs(config, monkeypatch, configs_of: str) -> list:
    """The FLATTEN configs of tuned_configs."""
    flattened = [c for c in tuned_configs(config, monkeypatch, configs_of) if c.kwargs["FLATTEN"]]
    assert flattened, configs_of
    return flattened


# The flattened wgrad builds a TMA descriptor per tile in global memory, fenced by one
# warp and read by two (benchmarks/RESULTS.md): a stale descriptor would corrupt a tile
# now and then, so each case runs several times.
FLATTENED_REPEATS = 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts", [EVEN_COUNTS_E, VARIANT_COUNTS_E], ids=["even", "skewed"])
def test_every_tuned_flattened_wgrad_config_matches_reference(counts, dtype, monkeypatch):
    """Each flattened wgrad config the autotuner may pick (128x128 capped to two
    programs an SM's registers, and 128x256), even and skewed routing, transposed
    output and not, against a per-expert loop."""
    _, config = triton_grouped_gemm("cuda", dtype)
    for launch in tuned_flattened_configs(config, monkeypatch, "wgrad_configs"):
        for transposed in (False, True):
            for _ in range(FLATTENED_REPEATS):
                check_wgrad_variant(True, True, transposed, False, dtype, "cuda", dim_x=200,
                                    flatten=True, counts=counts, launch_config=launch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
def test_every_tuned_flattened_forward_config_matches_reference(gather, dtype, monkeypatch):
    """Each flattened forward config the autotuner may pick (pointer and TMA loads,
    128x128 and 128x256 tiles, three stages), against a per-expert loop."""
    _, config = triton_grouped_gemm("cuda", dtype)
    for launch in tuned_flattened_configs(config, monkeypatch, "matmul_configs"):
        check_forward_variant(True, launch.kwargs["USE_TMA"], gather, "EXY", dtype, "cuda",
                              launch_config=launch)


# Each test launches a share of the configs, each a compile of its own: the GPU pass
# gives a test 120 s, with 16 workers compiling at once.
SHARES = 3


@pytest.mark.gpu
@pytest.mark.parametrize("share", range(SHARES))
@pytest.mark.parametrize("layout", ["EXY", "EYX_T"])
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
def test_every_tuned_forward_config_matches_reference(gather, layout, share, monkeypatch):
    """Each forward config the autotuner may pick (64x64 to 128x256 tiles, three and four
    stages, pointer and TMA loads, nested and flattened), bf16, w row-major and K-major,
    rows in order and gathered, in SHARES shares, against a per-expert loop."""
    _, config = triton_grouped_gemm("cuda", torch.bfloat16)
    launches = tuned_configs(config, monkeypatch, "matmul_configs")
    assert len(launches) > SHARES
    for launch in launches[share::SHARES]:
        check_forward_variant(launch.kwargs["FLATTEN"], launch.kwargs["USE_TMA"], gather,
                              layout, torch.bfloat16, "cuda", launch_config=launch)


@pytest.mark.gpu
@pytest.mark.parametrize("share", range(SHARES))
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EXY", "EYX"])
def test_every_tuned_wgrad_config_matches_reference(transposed, gather, share, monkeypatch):
    """Each wgrad config the autotuner may pick (grid and persistent, pointer and TMA,
    flattened, the two-stage tiles for short reductions), bf16, in SHARES shares,
    against a per-expert loop."""
    _, config = triton_grouped_gemm("cuda", torch.bfloat16)
    launches = tuned_configs(config, monkeypatch, "wgrad_configs")
    assert len(launches) > SHARES
    for launch in launches[share::SHARES]:
        flags = launch.kwargs
        check_wgrad_variant(flags["USE_TMA"], flags["PERSISTENT"], transposed, gather,
                            torch.bfloat16, "cuda", dim_x=200, flatten=flags["FLATTEN"],
                            launch_config=launch)
