"""Pre-emption through the real entry point: SIGTERM/SIGUSR1 -> checkpoint at the step's end, exit 0."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import BIN, REPO
from tests.launch_utils import launch_env


def _start(run_dir: Path, demo_data: Path) -> subprocess.Popen:
    args = [f"run_dir={run_dir}", f"data.path={demo_data / 'shards'}",
            f"data.tokenizer={demo_data / 'tokenizer.json'}", "trainer.max_steps=100000",
            "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
            "logging.log_every=1", "logging.progress_bar=false"]
    return subprocess.Popen([str(BIN / "llada-pretrain"), *args], cwd=REPO, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_signal_during_startup_and_during_training_checkpoints_and_exits(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    # config.yaml is written after the handlers are installed and before the model is built
    proc = _start(run_dir, demo_data)
    _wait_for(lambda: (run_dir / "config.yaml").exists(), proc, "start-up")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "pre-emption signal received: checkpointing at step 1" in out
    assert latest.read_text() == "step_00000001" and not (run_dir / "export").exists()

    proc = _start(run_dir, demo_data)  # resumes, then SIGUSR1 mid-training
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: _lines(metrics) >= 3, proc, "training steps")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out and "pre-emption signal received" in out
    stopped = int(latest.read_text().split("_")[1])
    assert 2 < stopped < 100000 and f"checkpointing at step {stopped}" in out
