"""The router's backward in the layer's dtype (dsv3.ops.linear.py) against the
fp32 backward it replaced (``F.linear`` on fp32 copies of x and the weight), side by
side: the layer step's time and the bytes autograd keeps for the backward.

Each (shape, dtype, setting) runs in a fresh process, the settings alternating
``--rounds`` times, so a drift of the machine falls on both. "fp32" swaps the old
router back into dsv3.moe for that process only. Saved bytes: what one forward keeps
for the backward (dsv3.train.metrics.saved_activation_bytes, parameters left out).

    python -m benchmarks.router_backward [--shapes T4096-D512-F256-E64-K2 ...]
                                         [--dtypes bf16] [--steps 30] [--rounds 2]
                                         [--write-results]
"""
import json
import statistics
import subprocess
import sys

SETTINGS = ("layer dtype", "fp32")


def _child(shape: str, dtype: str, steps: int, setting: str) -> None:
    """Times ``steps`` layer steps after a warm-up; prints them (ms) and the saved
    bytes of one forward as JSON."""
    import torch.nn.functional as F

    import dsv3.moe
    from benchmarks.side_by_side import dsv3_step_times
    from dsv3.train.metrics import saved_activation_bytes
    if setting == "fp32":
        dsv3.moe.router_logits = lambda x, w, dtype: F.linear(x.to(dtype), w.to(dtype))
    step, times = dsv3_step_times(shape, dtype, steps)
    counter = [0]
    with saved_activation_bytes(counter):
        step.forward()
    print(json.dumps({"times": times, "saved": counter[0]}))


def _run(shape: str, dtype: str, steps: int, setting: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.router_backward", "--child", shape, dtype,
               str(steps), setting]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def measure(shape: str, dtype: str, steps: int, rounds: int) -> dict:
    times, saved = {s: [] for s in SETTINGS}, {}
    for _ in range(rounds):
        for setting in SETTINGS:
            out = _run(shape, dtype, steps, setting)
            times[setting] += out["times"]
            saved[setting] = out["saved"]
    return {"shape": shape, "dtype": dtype,
            **{s: {"median_ms": statistics.median(times[s]), "saved_mib": saved[s] / 2**20}
               for s in SETTINGS}}


def table(rows: list[dict]) -> str:
    from benchmarks.side_by_side import two_setting_table
    return two_setting_table(rows, SETTINGS, "saved_mib", "saved MiB")


def main(argv=None) -> None:
    from benchmarks import side_by_side
    if argv is None and sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
        return
    args = side_by_side.parse(__doc__.split("\n\n")[0], argv, ["bf16"])
    side_by_side.run(args, measure, table, "", "Router backward in the layer's dtype against "
                     "fp32", "benchmarks.router_backward", argv)


if __name__ == "__main__":
    main()
