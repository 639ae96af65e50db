"""A rank that fails on purpose, for the ``llada-torchrun`` tests: ``python -m
tests.torchrun_child MODE`` under a launcher with 2 ranks.

MODE: ``bad-input`` (rank 0 prints one ``error:`` line, every rank exits 2, as
``cli/common.py`` does), ``crash`` (rank 1 raises; rank 0 waits to be stopped),
``killed`` (rank 1 is SIGKILLed; rank 0 waits) or ``preempt run_dir=D save_s=S`` (like the
trainer: on SIGTERM/SIGUSR1 take S seconds to "checkpoint" step 7 into D, then exit 0;
``D/ready.RANK`` appears once the handlers are installed), or ``fail LINE0 LINE1`` (rank R
stops through the entry points' ``_fail`` with LINE_R before any process group; ``-``: rank
R waits to be stopped instead).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def preempt(rank: int, run_dir: Path, save_s: float) -> None:
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    (run_dir / f"ready.{rank}").touch()
    deadline = time.monotonic() + 120
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(save_s)
    if rank == 0 and received:
        step = run_dir / "checkpoints" / "step_00000007"
        step.mkdir(parents=True)
        (step / "trainer_state.json").write_text('{"step": 7}')
        (run_dir / "checkpoints" / "latest").write_text(step.name)
    sys.exit(0 if received else 1)


def main(mode: str, *args: str) -> None:
    rank = int(os.environ["RANK"])
    if mode == "fail":
        line = args[rank]
        if line != "-":
            from llada_train.cli.common import _fail
            from llada_train.errors import LladaError

            _fail(LladaError(line), rank, int(os.environ["WORLD_SIZE"]), after_setup=False)
        time.sleep(120)  # stopped by the launcher once the other rank has failed
        sys.exit(0)
    if mode == "preempt":
        opts = dict(a.split("=", 1) for a in args)  # Hydra-style, as the launcher reads run_dir
        preempt(rank, Path(opts["run_dir"]), float(opts["save_s"]))
    if mode == "bad-input":
        if rank == 0:
            print("error: the one line a rank prints on bad input", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank == 0:
        time.sleep(120)  # stopped by the launcher once rank 1 has failed
        sys.exit(0)
    if mode == "crash":
        raise RuntimeError("a bug in rank 1")
    if mode == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
