"""Run a plain function on several gloo ranks in-process, for multi-rank tests.

``run_distributed(fn, world_size=2, args=(...))`` spawns ``world_size`` processes with
``torch.multiprocessing``, sets MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK/WORLD_SIZE, joins
a gloo process group, calls ``fn(*args)`` on every rank and tears the group down. An
exception on any rank is raised in the test process with that rank's traceback; a run that
outlives ``timeout_s`` (a collective that never completes) is killed and reported.

``fn`` and its arguments must be picklable: a module-level function of a test module.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        # a rank that exits without this may abort at interpreter exit (DEEPSPEED_CPU.md)
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, args: tuple[Any, ...] = (), timeout_s: float = 300.0
) -> None:
    """Run ``fn(*args)`` on ``world_size`` spawned gloo ranks; re-raise any rank's failure."""
    port = free_port()
    ctx = mp.start_processes(
        _rank_main, args=(world_size, port, fn, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    # join() raises ProcessRaisedException / ProcessExitedException carrying the rank's error
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed test did not finish in {timeout_s:.0f} s (a hung collective?)")
