"""One live job per run directory: rank 0 holds an OS lock on ``run_dir/run.lock``.

Two jobs writing one run_dir interleave metrics, race on checkpoints and leave ``latest``
naming a mix of two lineages. It happens on clusters when a script is submitted twice, or
resubmitted by hand while its requeued twin still runs. The lock is ``flock`` on an open
file: the kernel drops it when the process dies (kill -9 included), so a lock is never
stale while its file names a dead holder; the next job takes over and says so. On NFS,
``flock`` is carried as a POSIX lock by the server and is released when the client's lease
lapses (node loss).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from llada_train.errors import LladaError

LOCK_NAME = "run.lock"
_held: list[IO[str]] = []  # the open lock files of this process (closing one would release it)


def holder_info() -> dict[str, Any]:
    """Who holds a lock: host, pid, the SLURM job (if any) and when it started."""
    job = os.environ.get("SLURM_JOB_ID")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": job,
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT") if job else None,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def describe(holder: dict[str, Any]) -> str:
    """A holder as one phrase: 'SLURM job 12 (host n1, pid 345, since ...)'."""
    job = f"SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "a process"
    return (
        f"{job} (host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')})"
    )


def _read_holder(f: IO[str]) -> dict[str, Any] | None:
    f.seek(0)
    text = f.read().strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "since": "?"}


def hold_run_dir(run_dir: str | Path) -> None:
    """Take the run_dir's lock for the life of this process, or stop with one line naming
    the live holder. A holder that ends normally clears its name at exit; a name left behind
    means its process was killed (or its node lost): that lock is taken over with a warning."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    f = path.open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(f)
        f.close()
        who = describe(holder) if holder else "another process (it has not written its name yet)"
        raise LladaError(
            f"run_dir {run_dir} is in use by {who}: wait for it to end (or cancel it), or "
            "pick another run_dir; two jobs in one run_dir would mix their checkpoints"
        ) from None
    previous = _read_holder(f)
    if previous:
        print(
            f"warning: taking over {path}: its holder {describe(previous)} is no longer running "
            "(killed, or its node lost); resuming from the last complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
    # rewrite in place: the lock belongs to this inode, a rename would drop it
    f.seek(0)
    f.truncate()
    f.write(json.dumps(holder_info()) + "\n")
    f.flush()
    os.fsync(f.fileno())
    _held.append(f)
    atexit.register(_release, f)


def _release(f: IO[str]) -> None:
    """Clear the holder's name (a clean end), then drop the lock."""
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
        f.truncate()
        f.flush()
        f.close()
