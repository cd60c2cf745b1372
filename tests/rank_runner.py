"""Runs a function on W local processes joined in a gloo process group on
127.0.0.1, for the distributed tests. A failing rank's exception is re-raised in
the test with its traceback; a rank that hangs fails the test after ``timeout``
seconds instead of hanging CI."""
import os
import socket
import sys
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, collective_timeout, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)  # W ranks share 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=collective_timeout))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Done and checked: leave without the interpreter's teardown. There, gloo's and
    # DDP's C++ threads can outlive the objects they use, and a rank sometimes aborted
    # after passing ("terminate called without an active exception", twice in CI dry
    # runs). A failing fn raised above, and spawn reports its traceback as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world: int, fn, *args, timeout: float = 120, collective_timeout: float = 30):
    """fn(rank, world, *args) on ``world`` spawned processes (fn must be importable).
    The port free_port found may be taken by another process before rank 0 binds it
    (EADDRINUSE, seen once in a full run): then, as fn never ran, the ranks start
    again on another port, up to two more times."""
    for attempt in range(3):
        try:
            return _run_ranks_once(world, fn, args, timeout, collective_timeout)
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise


def _run_ranks_once(world: int, fn, args, timeout: float, collective_timeout: float):
    context = mp.start_processes(_entry, args=(world, free_port(), collective_timeout, fn, args),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"run_ranks: {fn.__name__} on {world} ranks still running after "
                               f"{timeout} s")
