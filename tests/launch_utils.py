"""Launch the real entry points as users do (torchrun / console scripts) from tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import BIN, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def torchrun_cmd(module: str, overrides: list[str], nproc: int = 2) -> list[str]:
    """``torchrun --nproc_per_node N -m MODULE overrides`` on a free port."""
    return [
        str(BIN / "torchrun"),
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        module,
        *overrides,
    ]


def run(cmd: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def cli(name: str, args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console script of this environment (``llada-pretrain`` ...)."""
    return run([str(BIN / name), *args], timeout=timeout, check=check)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line a failed run printed on stderr (a non-zero exit, no traceback)."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def python_module(module: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *args], timeout=timeout)


def branch_at(run_dir: Path, step: int, out: Path, with_metrics: bool = True) -> Path:
    """A new run dir ``out`` holding what ``run_dir`` held right after it saved step ``step``
    (``trainer.save_every``): that checkpoint as ``latest`` and, ``with_metrics``, the metrics
    rows up to it. Launching the run's command on ``out`` then resumes at ``step``, as a job
    pre-empted after that checkpoint does."""
    tag = f"step_{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)
    if with_metrics:
        rows = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
        (out / "metrics.jsonl").write_text("".join(r for r in rows if json.loads(r)["step"] <= step))
    return out
