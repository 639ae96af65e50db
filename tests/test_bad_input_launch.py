"""SIGTERM to ``launch/local.sh`` (the torchrun wrapper), alone (srun forwarding) or with every
process of the job (SLURM's proctrack/cgroup: scancel, the time limit): the ranks checkpoint
and exit; the launcher ends with one line naming the checkpoint and exit code 0, no torchrun
traceback (ranks that outlive the grace: tests/test_torchrun.py). Bad input under the
launcher is the rank's one line and exit code 2."""

from __future__ import annotations

import re
import signal
import subprocess

import psutil
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


def sigterm(proc: subprocess.Popen, every_process: bool) -> None:
    """SIGTERM to the launcher, or at once to it and all it started (the ranks)."""
    targets = [psutil.Process(proc.pid)]
    if every_process:
        targets += targets[0].children(recursive=True)
        assert len(targets) >= 3, targets  # llada-torchrun and two ranks
    for p in targets:
        p.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("every_process", [False, True], ids=["launcher", "every-process"])
def test_sigterm_checkpoints_and_ends_with_one_line(demo_data, tmp_path, every_process):
    run_dir = tmp_path / "run"
    cmd, env = local_job(demo_data, run_dir)
    log = tmp_path / "job.log"
    with job(cmd, env, log) as proc:
        wait_for_steps(proc, run_dir, log, 2)
        sigterm(proc, every_process)  # local.sh exec's the torchrun wrapper: same pid
        out = wait_exit(proc, log)
    assert proc.returncode == 0, out[-5000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-5000:]
    step = int(re.search(r"pre-emption signal received: checkpointing at step (\d+)", out)[1])
    assert 2 <= step < MAX_STEPS
    latest = f"step_{step:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == latest
    assert re.search(r"\] SIGTERM: asking the ranks to checkpoint and exit "
                     r"\(within 600 s, --shutdown-timeout\)", out)
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(
        rf"\[.+\] SIGTERM: training stopped with checkpoint {latest} in {run_dir}/checkpoints; "
        "run the same command to resume", last), last
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))
    assert run_info(run_dir)[0]["world_size"] == 2


def test_bad_batch_arithmetic_is_the_ranks_one_line(demo_data, tmp_path):
    cmd, env = local_job(demo_data, tmp_path / "run")
    cmd += ["trainer.global_batch_size=6"]  # 2 ranks x micro batch 2 = 4 does not divide it
    log = tmp_path / "job.log"
    with job(cmd, env, log) as proc:
        out = wait_exit(proc, log)
    assert proc.returncode == 2, out[-5000:]
    assert [ln for ln in out.splitlines() if ln.startswith("error:")] == [
        "error: trainer.global_batch_size=6 is not a multiple of trainer.micro_batch_size=2 x "
        "world size 2 = 4: pick a global batch divisible by 4"
    ], out[-5000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-5000:]
    assert not (tmp_path / "run" / "run_info.jsonl").exists()
