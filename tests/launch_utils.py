"""Launch the real entry points as users do (torchrun / console scripts) from tests."""

from __future__ import annotations

import json
import os
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


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def python_module(module: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *args], timeout=timeout)
