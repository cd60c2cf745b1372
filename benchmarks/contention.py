"""How many cores other processes took while the benchmarks ran.

The development machines are shared: a build or test run next to the benchmarks
slows the per-expert GEMM loops (dsv3, the reference, torch._grouped_mm: hundreds
of short multithreaded calls, each waiting on its slowest thread) far more than
the few large GEMMs of the dense bound, so ratios against the bound inflate
(measured on the E=64, K=8 fp32 case: a two-thread torch process running small
ops alongside slows dsv3 ~3.5x and grouped_mm ~3x but dense ~2x). Recording the
foreign load says whether a run's table can be trusted.

Foreign CPU = machine busy time (/proc/stat) - the CPU time of this process
and its waited-for children (getrusage), over the wall time.
"""
import os
import resource
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    wall_s: float
    machine_busy_s: float
    own_cpu_s: float


def _machine_busy_s() -> float:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    # guest time is already counted inside user time, so leave it out of the sum
    busy = sum(fields[:8]) - idle - iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def snapshot() -> Snapshot:
    return Snapshot(time.monotonic(), _machine_busy_s(), _own_cpu_s())


def foreign_cores(before: Snapshot, after: Snapshot) -> float:
    """Average number of cores used by other processes between two snapshots
    (children must have been waited for by ``after``)."""
    foreign_s = ((after.machine_busy_s - before.machine_busy_s)
                 - (after.own_cpu_s - before.own_cpu_s))
    return max(0.0, foreign_s) / max(after.wall_s - before.wall_s, 1e-9)
