"""Validation inside a real ``llada-pretrain`` run: logged, plotted, and the training untouched."""

from __future__ import annotations

import math

import pytest

from tests.launch_utils import cli, metrics


def run_args(run_dir, demo_data, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={demo_data / 'shards'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}",
        "data.val_fraction=0.05",  # both runs hold out the same windows: same training data
        "trainer.max_steps=6",
        "trainer.seq_len=64",
        "trainer.precision=fp32",
        "logging.log_every=1",
        "logging.progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    on, off = root / "on", root / "off"
    proc = cli("llada-pretrain", run_args(on, demo_data, "trainer.eval_every=2",
                                          "trainer.eval_windows=6",
                                          "trainer.eval_samples_per_window=3"))
    cli("llada-pretrain", run_args(off, demo_data))
    return on, off, proc


def test_validation_leaves_the_training_losses_bitwise_unchanged(runs):
    on, off, _ = runs
    assert [m["loss"] for m in metrics(on)] == [m["loss"] for m in metrics(off)]
    assert [m["grad_norm"] for m in metrics(on)] == [m["grad_norm"] for m in metrics(off)]


def test_validation_is_logged_every_n_steps_with_its_standard_error(runs):
    on, _, proc = runs
    rows = [m for m in metrics(on) if "val_loss" in m]
    assert [m["step"] for m in rows] == [2, 4, 6]
    for m in rows:
        assert 0 < m["val_loss_se"] < m["val_loss"] < 20
        assert m["val_bpt"] == pytest.approx(m["val_loss"] / math.log(2))
    assert "val_loss" in proc.stdout and "val_bpt" in proc.stdout


def test_plot_draws_validation_beside_the_training_loss(runs):
    on, _, _ = runs
    cli("llada-plot", [str(on)])
    assert (on / "plots" / "curves.png").stat().st_size > 10_000


def test_eval_every_without_validation_data_is_one_line(demo_data, tmp_path):
    proc = cli("llada-pretrain", [f"run_dir={tmp_path / 'r'}", f"data.path={demo_data / 'shards'}",
                                  f"data.tokenizer={demo_data / 'tokenizer.json'}",
                                  "trainer.eval_every=2", "trainer.max_steps=1"], check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "trainer.eval_every=2" in line and "data.val_fraction" in line
