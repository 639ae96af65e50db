"""SIGTERM to ``launch/local.sh`` (the torchrun wrapper): the ranks are signalled directly,
checkpoint and exit; the launcher ends with one line naming the checkpoint and exit code 0,
no torchrun traceback; ranks that outlive ``LLADA_TERM_GRACE_S`` are killed (exit 143)."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from tests.launch_utils import metrics
from tests.test_launch import LAUNCH, job, job_env, pretrain_args, run_info, wait_for_steps

pytestmark = pytest.mark.slow

MAX_STEPS = 60


def local_job(demo_data, run_dir, **env_extra: str):
    env = job_env(**env_extra)
    env.pop("GPUS_PER_NODE")
    env.pop("MASTER_PORT")
    cmd = [LAUNCH / "local.sh", "--nproc", "2", "--device", "cpu", "pretrain",
           *pretrain_args(demo_data, run_dir, f"trainer.max_steps={MAX_STEPS}")]
    return cmd, env


def wait_exit(proc: subprocess.Popen, log, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-5000:]}") from None
    return log.read_text()


def test_sigterm_checkpoints_and_ends_with_one_line(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    cmd, env = local_job(demo_data, run_dir)
    log = tmp_path / "job.log"
    with job(cmd, env, log) as proc:
        wait_for_steps(proc, run_dir, log, 2)
        proc.send_signal(signal.SIGTERM)  # local.sh exec's the torchrun wrapper: same pid
        out = wait_exit(proc, log)
    assert proc.returncode == 0, out[-5000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-5000:]
    step = int(re.search(r"pre-emption signal received: checkpointing at step (\d+)", out)[1])
    assert 2 <= step < MAX_STEPS
    latest = f"step_{step:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == latest
    assert re.search(r"\] SIGTERM: asking the ranks to checkpoint and exit "
                     r"\(within LLADA_TERM_GRACE_S=600 s\)", out)
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(
        rf"\[.+\] SIGTERM: training stopped with checkpoint {latest} in {run_dir}/checkpoints; "
        "run the same command to resume", last), last
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))
    assert run_info(run_dir)[0]["world_size"] == 2


def test_ranks_outliving_the_grace_are_killed(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    # a zero grace: the ranks are killed at once instead of being asked to save
    cmd, env = local_job(demo_data, run_dir, LLADA_TERM_GRACE_S="0")
    log = tmp_path / "job.log"
    with job(cmd, env, log) as proc:
        wait_for_steps(proc, run_dir, log, 2)
        proc.send_signal(signal.SIGTERM)
        out = wait_exit(proc, log)
    assert proc.returncode == 143, out[-5000:]
    assert "pre-emption signal received" not in out and "Traceback" not in out, out[-5000:]
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(
        rf"\[.+\] SIGTERM: the ranks did not exit within LLADA_TERM_GRACE_S=0 s and were killed; "
        rf"the last complete checkpoint is none in {run_dir}/checkpoints", last), last
