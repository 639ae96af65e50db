"""The run_dir lock (llada_train/train/run_lock.py) between real processes, without SLURM.

The same lock is tested on a live scheduler in tests/test_slurm_live.py (a twin job refused,
a killed job's lock taken over by the next submission).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llada_train.errors import LladaError
from llada_train.train import run_lock

HOLD = """
import sys, time
from llada_train.train.run_lock import hold_run_dir
hold_run_dir(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(run_dir: Path, seconds: float, env: dict | None = None) -> subprocess.Popen:
    """A process that takes the lock, says so, and keeps it ``seconds``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def test_a_live_holder_refuses_a_second_process_with_one_line(tmp_path):
    proc = holder(tmp_path / "run", 60, env={**os.environ, "SLURM_JOB_ID": "77"})
    try:
        with pytest.raises(LladaError) as err:
            run_lock.hold_run_dir(tmp_path / "run")
        text = str(err.value)
        assert "\n" not in text
        assert text.startswith(f"run_dir {tmp_path / 'run'} is in use by SLURM job 77 (host ")
        assert f"pid {proc.pid}," in text and "pick another run_dir" in text
    finally:
        proc.kill()
        proc.wait()


def test_a_clean_exit_clears_the_name_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = holder(run_dir, 0)
    proc.wait(timeout=30)
    assert (run_dir / run_lock.LOCK_NAME).read_text() == ""  # ended normally: nothing left

    proc = holder(run_dir, 60)
    left = json.loads((run_dir / run_lock.LOCK_NAME).read_text())
    assert left["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run_lock.hold_run_dir(run_dir)  # the kernel dropped the dead process's lock
    err = capsys.readouterr().err
    assert err.startswith(
        f"warning: taking over {run_dir / run_lock.LOCK_NAME}: its holder a process"
    )
    assert f"pid {proc.pid}," in err
    mine = json.loads((run_dir / run_lock.LOCK_NAME).read_text())
    assert mine["pid"] != proc.pid
    # and now this process holds it: another process is refused
    probe = subprocess.run(
        [sys.executable, "-c", HOLD, str(run_dir), "0"], capture_output=True, text=True, timeout=60
    )
    assert probe.returncode != 0 and "is in use by a process" in probe.stderr
    # release for the rest of this pytest process (the lock would live until it exits)
    for f in run_lock._held:
        run_lock._release(f)
    run_lock._held.clear()
