"""benchmarks/gpu_bench.py runs only on a lent GPU, minutes per session: its
``--smoke`` mode runs every case on tiny CPU tensors here, so a broken case is
found in CI and not on the GPU's clock."""
import json

from benchmarks import gpu_bench


def test_every_gpu_benchmark_case_runs_and_agrees_with_its_peer(tmp_path):
    gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    benches = {row["bench"] for row in rows}
    assert {"grouped_mm fwd", "grouped_mm dgrad", "grouped_mm wgrad", "permute", "unpermute",
            "layer fwd+bwd", "quantize_int8 (error feedback)"} <= benches
    assert [row for row in rows if "error" in row] == []
    for row in rows:
        assert row["dsv3_ms"] > 0
        # bf16 against the peer's bf16: rounding only (the layer may route a near-tie apart).
        assert row.get("rel_err", 0.0) < 2e-2, row
    assert (tmp_path / "gpu_bench.md").read_text().count("\n|") == len(rows) + 2  # + header and rule
