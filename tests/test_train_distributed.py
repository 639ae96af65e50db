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

from llada_train.cli.export import main as export_main
from tests.conftest import REPO
from tests.launch_utils import launch_env, metrics, run, torchrun_cmd

pytestmark = pytest.mark.slow

STEPS = 5
# the kill -9 test's run: the kill lands after checkpoint 10, ten steps before its end
KILL_TOTAL, KILL_EVERY = 20, 5
KILL_RUN = [f"trainer.max_steps={KILL_TOTAL}", f"trainer.save_every={KILL_EVERY}", "deepspeed=zero2",
            "schedule.peak_lr=4e-4"]


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
    """The same first 5 steps under ZeRO 0, 1, 2 and 3.

    At the paper's peak rate (4e-4): ZeRO-3 reduces gradients in another order, and Adam
    amplifies those last-bit differences with the rate (3e-3 gave 5e-5 by step 5).

    The ZeRO-2 run is also the uninterrupted reference of the kill -9 test (one launch less):
    it goes on to step 20 with checkpoints every 5, which leaves its first 5 steps as they
    are (the schedule's warmup depends on the step alone, the masks on seed, step and index).
    """
    root = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = root / f"zero{stage}"
        extra = KILL_RUN if stage == 2 else [f"deepspeed=zero{stage}", f"trainer.max_steps={STEPS}",
                                             "schedule.peak_lr=4e-4"]
        if stage == 1:  # the export tests read stages 0 and 3, the kill -9 test stage 2
            extra = [*extra, "trainer.export_at_end=false"]
        run(torchrun_cmd("llada_train.cli.pretrain", overrides(demo_data, run_dir, *extra)))
        runs[stage] = run_dir
    return runs


@pytest.mark.isa
def test_zero_stages_give_the_same_losses(zero_runs):
    reference = [m["loss"] for m in metrics(zero_runs[0])]
    assert len(reference) == STEPS
    for stage in (1, 2, 3):
        losses = [m["loss"] for m in metrics(zero_runs[stage])][:STEPS]
        assert losses == pytest.approx(reference, abs=1e-5), stage


def test_zero3_export_equals_zero0_weights(zero_runs, tmp_path):
    w0 = load_file(zero_runs[0] / "export" / "model.safetensors")
    w3 = load_file(zero_runs[3] / "export" / "model.safetensors")
    assert w0.keys() == w3.keys()
    for k in w0:
        assert torch.allclose(w0[k], w3[k], atol=1e-5, rtol=0), k
    # the offline exporter reads the ZeRO-3 shards back to the same weights (its `main` in this
    # process: the point is what it reads, not its launch, which tests/test_block_train.py and
    # tests/test_moe_bias_zero3.py launch as the console script)
    export_main(["--run-dir", str(zero_runs[3]), "--out", str(tmp_path / "offline")])
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    for k in w3:
        assert torch.equal(offline[k], w3[k]), k


def test_stage0_offline_export_equals_live_export(zero_runs, tmp_path):
    export_main(["--run-dir", str(zero_runs[0]), "--out", str(tmp_path / "offline")])
    live = load_file(zero_runs[0] / "export" / "model.safetensors")
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    assert all(torch.equal(live[k], offline[k]) for k in live)


def _worker_pids(launcher: subprocess.Popen) -> list[int]:
    return [p.pid for p in psutil.Process(launcher.pid).children(recursive=True)
            if "llada_train.cli.pretrain" in " ".join(p.cmdline())]


def test_kill_9_of_one_rank_then_relaunch_is_bitwise_equal(demo_data, zero_runs, tmp_path):
    reference = zero_runs[2]  # the same 20 steps, never interrupted
    killed = tmp_path / "killed"
    cmd = torchrun_cmd("llada_train.cli.pretrain", overrides(demo_data, killed, *KILL_RUN))
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
    assert stopped_at < KILL_TOTAL

    proc = run(torchrun_cmd("llada_train.cli.pretrain", overrides(demo_data, killed, *KILL_RUN)))
    assert f"at step {stopped_at}" in proc.stdout
    ref_w = load_file(reference / "export" / "model.safetensors")
    res_w = load_file(killed / "export" / "model.safetensors")
    assert all(torch.equal(ref_w[k], res_w[k]) for k in ref_w), "resumed weights differ"
    ref_losses = {m["step"]: m["loss"] for m in metrics(reference)}
    res_losses = {m["step"]: m["loss"] for m in metrics(killed)}  # the resumed steps overwrite
    assert all(res_losses[s] == ref_losses[s] for s in range(stopped_at + 1, KILL_TOTAL + 1))


def _nan_run(demo_data, run_dir, flags: list[str], *extra: str, check: bool = True):
    """The real pre-training entry with a test-side objective that poisons chosen micro-batches."""
    cmd = torchrun_cmd("tests.nan_objective_run", [*flags, *overrides(demo_data, run_dir, *extra)])
    return run(cmd, check=check)


@pytest.fixture(scope="module")
def nan_stage0(demo_data, tmp_path_factory):
    """One ZeRO-0 run through every non-finite case, 2 micro-batches per step (per rank):

    step 2: batch 3's loss is NaN; the step is redone on batches 5-6
    step 3: batch 8's gradient is NaN, its loss finite; the step is redone on batches 9-10
    step 4: batches 11-12, checkpointed (save_every=1)
    step 5: its three attempts (batches 13-14, 15-16, 17-18) have NaN losses: the run stops
    """
    run_dir = tmp_path_factory.mktemp("nan") / "run"
    proc = _nan_run(demo_data, run_dir,
                    ["--nan-loss-at", "3,13,14,15,16,17,18", "--nan-grad-at", "8"],
                    "trainer.max_steps=6", "trainer.save_every=1", "trainer.max_bad_steps=3",
                    "deepspeed=zero0", check=False)
    return run_dir, proc


def test_nan_loss_skips_the_step_and_counts_it(nan_stage0):
    run_dir, proc = nan_stage0
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], proc.stderr[-3000:]
    assert [r["skipped_steps"] for r in rows][:2] == [0, 1]  # step 2's NaN loss
    assert all(r["loss"] == r["loss"] for r in rows)  # every logged loss is finite
    state = json.loads((run_dir / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 2 and state["batches_drawn"] == 12  # 4 steps + 2 redone


@pytest.mark.parametrize("stage", [0, 2])
def test_nan_gradient_with_finite_loss_is_skipped(demo_data, tmp_path, nan_stage0, stage):
    # stage 0: the trainer checks the gradient norm itself; ZeRO-2 partitions the gradients,
    # and DeepSpeed's own overflow check (agreed over ranks) must skip
    if stage == 0:  # the shared ZeRO-0 run: step 3's NaN gradient is the second skip
        run_dir, expected = nan_stage0[0], [0, 1, 2, 2]
    else:
        run_dir, expected = tmp_path / "nan_grad", [0, 1, 1]
        _nan_run(demo_data, run_dir, ["--nan-grad-at", "4"], "trainer.max_steps=3",
                 f"deepspeed=zero{stage}", "trainer.export_at_end=false")
    rows = metrics(run_dir)
    assert [r["skipped_steps"] for r in rows] == expected
    assert all(r["loss"] == r["loss"] and r["grad_norm"] < 1e3 for r in rows)


def test_nan_losses_in_a_row_stop_the_run_without_a_bad_checkpoint(nan_stage0):
    run_dir, proc = nan_stage0
    assert proc.returncode != 0
    assert "3 non-finite steps in a row" in proc.stderr
    # batches 1-12 made steps 1-4; the last checkpoint is the intact step 4
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
