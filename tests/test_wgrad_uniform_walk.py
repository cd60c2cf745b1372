"""The flattened wgrad's choice of walk (grouped_gemm_kernels._uniform_steps): its
uniform loop only while every tile running the longest expert's steps costs at most
5/4 of the experts' own, the nested loop otherwise. Both walks give the same gradient
(tests/test_grouped_mm.py checks each against the reference), so which one ran shows
only here: a probe kernel returns the choice, under TRITON_INTERPRET=1."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dsv3.kernels import config  # noqa: E402
from dsv3.kernels.grouped_gemm_kernels import _uniform_steps  # noqa: E402
from test_grouped_mm import EVEN_COUNTS_E, VARIANT_COUNTS_E  # noqa: E402


@triton.jit
def _choice_probe(offsets_ptr, out_ptr, n_experts, n_rows, BLOCK_K: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    taken, max_steps = _uniform_steps(offsets_ptr, n_experts, n_rows, BLOCK_K, BLOCK_E)
    tl.store(out_ptr, taken.to(tl.int32))
    tl.store(out_ptr + 1, max_steps)


@pytest.mark.parametrize("counts, block_k, uniform", [
    (EVEN_COUNTS_E, 16, True), (EVEN_COUNTS_E, 64, True),  # the CPU's and a GPU's steps
    (VARIANT_COUNTS_E, 16, False), (VARIANT_COUNTS_E, 64, False),
    ([128, 128, 128, 64], 64, True),  # 2 steps x 4 experts against 7: 1.14
    ([128, 128, 64, 64], 64, False),  # 2 x 4 against 6: 1.33
    ([0, 0, 0], 16, True)], ids=str)  # no rows: nothing to waste
def test_uniform_walk_taken_for_even_routing_only(counts, block_k, uniform):
    if not config.INTERPRET:
        pytest.skip("a probe kernel on CPU tensors: under TRITON_INTERPRET=1")
    offsets_E = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = torch.zeros(2, dtype=torch.int32)
    # 3 rows past the last expert (dropped copies): not an expert's steps
    _choice_probe[(1,)](offsets_E, out, len(counts), int(offsets_E[-1]) + 3, block_k,
                        triton.next_power_of_2(len(counts) + 1))
    assert out[1] == max(-(-count // block_k) for count in counts)
    assert bool(out[0]) == uniform
