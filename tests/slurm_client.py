"""Driving the live one-node SLURM of tests/test_slurm_live.py as a user and an operator do:
sbatch / scontrol / scancel, waiting on job states and steps, pausing ranks (SIGSTOP) while a
time-limit warning is on its way, releasing a requeued job."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import REPO
from tests.launch_utils import launch_env


class Slurm:
    """sbatch / scontrol / scancel against the live cluster, as a user runs them."""

    def __init__(self, cluster, out_dir: Path) -> None:
        self.env = {
            **launch_env(),
            **cluster.env(),
            "GPUS_PER_NODE": "2",
            "LLADA_DEVICE": "cpu",
            "LLADA_PYTHON": sys.executable,
        }
        # a login shell's environment: no job of an outer SLURM, and no rendezvous settings
        # that a test of this process (an in-process process group) may have left behind
        leftovers = ("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_", "TORCHELASTIC_")
        launcher = {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
        for key in [k for k in self.env if k.startswith(leftovers) or k in launcher]:
            del self.env[key]
        self.out_dir = out_dir
        self.jobcomp = cluster.base / "jobcomp.txt"

    def cmd(self, *args: str) -> str:
        proc = subprocess.run(
            list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
        return proc.stdout.strip()

    def submit(
        self, script: str, overrides: list[str], *opts: str, name: str = "job"
    ) -> tuple[str, Path]:
        """``sbatch`` from the repository root; returns (job id, output file)."""
        out = self.out_dir / f"{name}.out"
        jid = self.cmd(
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--oversubscribe",
            "--time=10",  # a bound on a job the test loses track of
            f"--output={out}",
            *opts,
            f"launch/slurm/{script}",
            *overrides,
        )
        return jid.split(";")[0], out

    def job(self, jid: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
        text = self.cmd("scontrol", "show", "job", "-o", jid)
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def wait_state(
        self, jid: str, out: Path, states: set[str], timeout: float = 300
    ) -> dict[str, str]:
        """Until the job is in one of ``states``; its ``scontrol show job`` then."""
        deadline = time.time() + timeout
        while True:
            info = self.job(jid)
            if info["JobState"] in states:
                return info
            if time.time() > deadline:
                raise AssertionError(
                    f"job {jid} is {info['JobState']}, not {states}:\n{output_tail(out)}"
                )
            time.sleep(0.5)

    def on_steps(
        self, runs: dict[str, tuple[Path, Path, int, Callable[[], object]]], timeout: float = 300
    ) -> None:
        """For runs started side by side (job id -> (output, run_dir, n, action)): until each
        has logged its ``n`` steps, calling its action as soon as it has (pause it, signal
        it...), so that no run trains on far past its point while the others get there."""
        deadline = time.time() + timeout
        waiting = dict(runs)
        while waiting:
            for jid, (out, run_dir, n, action) in list(waiting.items()):
                rows = run_dir / "metrics.jsonl"
                if rows.exists() and len(rows.read_text().splitlines()) >= n:
                    action()
                    del waiting[jid]
                    continue
                state = self.job(jid)["JobState"]
                assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
                    f"job {jid} {state}:\n{output_tail(out)}"
                )
                assert time.time() < deadline, (
                    f"job {jid}: not {n} steps in {timeout} s:\n{output_tail(out)}"
                )
            time.sleep(0.1)

    def runs_of(self, jid: str) -> list[str]:
        """The job's ended runs from the job completion log (a requeue ends one run)."""
        if not self.jobcomp.exists():
            return []
        return [
            m.group(1)
            for line in self.jobcomp.read_text().splitlines()
            if (m := re.match(rf"JobId={jid} .*JobState=(\w+)", line))
        ]


def output_tail(path: Path, chars: int = 4000) -> str:
    """The end of a job's output file, then the end of the scheduler's logs."""
    text = path.read_text()[-chars:] if path.exists() else "(no output yet)"
    logs = sorted(Path("/tmp").glob(f"llada-slurm-{os.getpid()}/log/*.log"))
    for log in logs:  # the scheduler's side of the story
        text += f"\n--- {log.name} (tail) ---\n" + "\n".join(log.read_text().splitlines()[-25:])
    return text


def training_ranks(run_dir: Path) -> list[psutil.Process]:
    """The job's rank processes (and their data workers): ``python -m llada_train.cli.<task>``
    with this run_dir, not the torchrun wrapper, srun or the batch shell."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if (f"run_dir={run_dir}" in cmd and "llada_train.cli.torchrun" not in cmd
                and any(c.startswith("llada_train.cli.") for c in cmd)):  # fmt: skip
            found.append(proc)
    return found


@contextlib.contextmanager
def paused(ranks: list[psutil.Process]):
    """SIGSTOP the ranks for the block (to the job, one very slow step), then SIGCONT."""
    assert len(ranks) >= 2, [r.cmdline() for r in ranks]
    for rank in ranks:
        rank.suspend()
    try:
        yield
    finally:
        for rank in ranks:
            with contextlib.suppress(psutil.Error):
                rank.resume()


def cut_time_limit(slurm: Slurm, jid: str) -> None:
    """Shorten a running job's time limit to 3-4 minutes ahead, inside its --signal window
    (submit with ``--signal=B:USR1@240``): the warning then comes from SLURM's own time-limit
    check, which runs about every 30 s, and leaves at least 150 s before the limit itself.
    Callers pause the ranks until it arrives (a short run would otherwise end first)."""
    elapsed = slurm.job(jid)["RunTime"]
    elapsed_min = int(elapsed.split(":")[-2]) if ":" in elapsed else 0
    slurm.cmd("scontrol", "update", f"JobId={jid}", f"TimeLimit={elapsed_min + 4}")


def wait_for_warning(out: Path, timeout: float = 90) -> None:
    """Until the job's batch script reports the SIGUSR1 warning."""
    deadline = time.time() + timeout
    while "SIGUSR1 received by the batch script" not in out.read_text():
        assert time.time() < deadline, (
            f"no warning {timeout:.0f} s after the cut:\n{output_tail(out)}"
        )
        time.sleep(0.2)


def release_requeued(slurm: Slurm, jid: str, out: Path) -> None:
    """Once the job has requeued itself: its long time limit back (cut_time_limit shortened
    it). It starts again by itself cred_expire + 1 s later (scripts/local_slurm.py): a start
    forced earlier (``scontrol update StartTime=now``) once failed to launch in CI."""
    info = slurm.wait_state(jid, out, {"PENDING", "COMPLETED", "FAILED"})
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", f"{info}\n{output_tail(out)}"
    slurm.cmd("scontrol", "update", f"JobId={jid}", "TimeLimit=10")
