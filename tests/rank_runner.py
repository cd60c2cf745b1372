"""Runs a function on W local processes joined in a gloo process group on
127.0.0.1, for the distributed tests. A failing rank's exception is re-raised in
the test with its traceback; a rank that hangs fails the test after ``timeout``
seconds instead of hanging CI."""
import os
import socket
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


def run_ranks(world: int, fn, *args, timeout: float = 120, collective_timeout: float = 30):
    """fn(rank, world, *args) on ``world`` spawned processes (fn must be importable)."""
    context = mp.start_processes(_entry, args=(world, free_port(), collective_timeout, fn, args),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"run_ranks: {fn.__name__} on {world} ranks still running after "
                               f"{timeout} s")
