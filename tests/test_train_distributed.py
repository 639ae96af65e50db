"""Real 2-rank DeepSpeed runs on CPU (gloo), launched with torchrun as users do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.launch_utils import cli, launch_env, metrics, run, torchrun_cmd

pytestmark = pytest.mark.slow

STEPS = 5


def overrides(demo_data, run_dir, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={demo_data / 'shards'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}",
        "trainer.seq_len=32",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=2",  # 2 ranks x 2 x 2 accumulation steps
        "logging.log_every=1",
        "logging.progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def zero_runs(demo_data, tmp_path_factory):
    """The same 5 steps under ZeRO 0, 1, 2 and 3.

    At the paper's peak rate (4e-4): ZeRO-3 reduces gradients in another order, and Adam
    amplifies those last-bit differences with the rate (3e-3 gave 5e-5 by step 5).
    """
    root = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = root / f"zero{stage}"
        run(torchrun_cmd("llada_train.cli.pretrain",
                         overrides(demo_data, run_dir, f"deepspeed=zero{stage}", f"trainer.max_steps={STEPS}",
                                   "schedule.peak_lr=4e-4")))
        runs[stage] = run_dir
    return runs


@pytest.mark.isa
def test_zero_stages_give_the_same_losses(zero_runs):
    reference = [m["loss"] for m in metrics(zero_runs[0])]
    assert len(reference) == STEPS
    for stage in (1, 2, 3):
        losses = [m["loss"] for m in metrics(zero_runs[stage])]
        assert losses == pytest.approx(reference, abs=1e-5), stage


def test_zero3_export_equals_zero0_weights(zero_runs, tmp_path):
    w0 = load_file(zero_runs[0] / "export" / "model.safetensors")
    w3 = load_file(zero_runs[3] / "export" / "model.safetensors")
    assert w0.keys() == w3.keys()
    for k in w0:
        assert torch.allclose(w0[k], w3[k], atol=1e-5, rtol=0), k
    # the offline exporter reads the ZeRO-3 shards back to the same weights
    cli("llada-export", ["--run-dir", str(zero_runs[3]), "--out", str(tmp_path / "offline")])
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    for k in w3:
        assert torch.equal(offline[k], w3[k]), k


def test_stage0_offline_export_equals_live_export(zero_runs, tmp_path):
    cli("llada-export", ["--run-dir", str(zero_runs[0]), "--out", str(tmp_path / "offline")])
    live = load_file(zero_runs[0] / "export" / "model.safetensors")
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    assert all(torch.equal(live[k], offline[k]) for k in live)


def _worker_pids(launcher: subprocess.Popen) -> list[int]:
    return [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)
            if "llada_train.cli.pretrain" in " ".join(p.cmdline())]


def test_kill_9_of_one_rank_then_relaunch_is_bitwise_equal(demo_data, tmp_path):
    total, every = 40, 5
    common = [f"trainer.max_steps={total}", f"trainer.save_every={every}", "deepspeed=zero2"]
    reference = tmp_path / "reference"
    run(torchrun_cmd("llada_train.cli.pretrain", overrides(demo_data, reference, *common)))

    killed = tmp_path / "killed"
    cmd = torchrun_cmd("llada_train.cli.pretrain", overrides(demo_data, killed, *common))
    launcher = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step_00000010"):
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint appeared"
    os.kill(_worker_pids(launcher)[-1], signal.SIGKILL)  # one rank dies mid-run
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    stopped_at = int(latest.read_text().split("_")[1])
    assert stopped_at < total

    proc = run(torchrun_cmd("llada_train.cli.pretrain", overrides(demo_data, killed, *common)))
    assert f"at step {stopped_at}" in proc.stdout
    ref_w = load_file(reference / "export" / "model.safetensors")
    res_w = load_file(killed / "export" / "model.safetensors")
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w), "resumed weights differ"
    ref_losses = {m["step"]: m["loss"] for m in metrics(reference)}
    res_losses = {m["step"]: m["loss"] for m in metrics(killed)}  # the resumed steps overwrite
    assert all(res_losses[s] == ref_losses[s] for s in range(stopped_at + 1, total + 1))


def _nan_run(demo_data, run_dir, flags: list[str], *extra: str, check: bool = True):
    """The real pre-training entry with a test-side objective that poisons chosen micro-batches."""
    cmd = torchrun_cmd("tests.nan_objective_run", [*flags, *overrides(demo_data, run_dir, *extra)])
    return run(cmd, check=check)


def test_nan_loss_skips_the_step_and_counts_it(demo_data, tmp_path):
    # 2 micro-batches per step: batch 3 poisons step 2's window, which is redone on batches 5-6
    run_dir = tmp_path / "nan"
    _nan_run(demo_data, run_dir, ["--nan-loss-at", "3"], "trainer.max_steps=4")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in rows)  # every logged loss is finite
    state = json.loads((run_dir / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["batches_drawn"] == 10  # 4 steps + 1 redone


@pytest.mark.parametrize("stage", [0, 2])
def test_nan_gradient_with_finite_loss_is_skipped(demo_data, tmp_path, stage):
    # stage 0: the trainer checks the gradient norm itself; ZeRO-2 partitions the gradients,
    # and DeepSpeed's own overflow check (agreed over ranks) must skip
    run_dir = tmp_path / "nan_grad"
    _nan_run(demo_data, run_dir, ["--nan-grad-at", "4"], "trainer.max_steps=3", f"deepspeed=zero{stage}")
    rows = metrics(run_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] < 1e3 for r in rows)


def test_nan_losses_in_a_row_stop_the_run_without_a_bad_checkpoint(demo_data, tmp_path):
    run_dir = tmp_path / "nan_stop"
    # step 4's three attempts (batches 7-8, 9-10, 11-12) are all poisoned
    proc = _nan_run(demo_data, run_dir, ["--nan-loss-at", "7,8,9,10,11,12"], "trainer.max_steps=6",
                    "trainer.save_every=1", "trainer.max_bad_steps=3", check=False)
    assert proc.returncode != 0
    assert "3 non-finite steps in a row" in proc.stderr
    # batches 1-6 made steps 1-3 (2 per step); the last checkpoint is the intact step 3
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
