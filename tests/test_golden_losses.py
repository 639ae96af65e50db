"""Golden loss curves: the first 30 losses of a fixed tiny pre-training and SFT run on CPU
(fp32, one rank) against ``tests/assets/losses/{pretrain,sft}.json``.

A numeric change anywhere (model, objective, masks, data order, optimizer) fails here with
the first mismatching steps. Re-record only on purpose: ``make golden``
(``LLADA_RECORD_GOLDEN=1 pytest tests/test_golden_losses.py``), then review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.launch_utils import cli, metrics

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).parent / "assets" / "losses"
STEPS, REL = 30, 1e-4
RECORD = os.environ.get("LLADA_RECORD_GOLDEN") == "1"
# the fixed runs, less their paths (kept in the asset so a reader knows what was run)
COMMON = ["trainer.max_steps=30", "trainer.global_batch_size=8", "trainer.micro_batch_size=8",
          "trainer.precision=fp32", "logging.log_every=1", "logging.progress_bar=false", "seed=0"]
RUNS = {
    "pretrain": [*COMMON, "trainer.seq_len=64"],
    "sft": ["trainer=sft_demo", "schedule=sft_demo", "trainer.epochs=0", *COMMON],
}


def mismatch_report(name: str, got: list[float], want: list[float]) -> str:
    """The first mismatching steps as a table (step, golden, now, relative difference)."""
    rows = [f"{name}: losses moved from the golden curve (rel tolerance {REL:g}); first mismatches:",
            f"{'step':>5} {'golden':>12} {'now':>12} {'rel diff':>10}"]
    bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True))
           if abs(g - w) > REL * abs(w)]
    for i in bad[:8]:
        rows.append(f"{i + 1:>5} {want[i]:>12.7f} {got[i]:>12.7f} {abs(got[i] - want[i]) / abs(want[i]):>10.2e}")
    rows.append("re-record on purpose with `make golden` if the change is intended")
    return "\n".join(rows)


def check_or_record(name: str, run_dir: Path) -> None:
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == STEPS
    path = ASSETS / f"{name}.json"
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        asset = {"run": RUNS[name], "torch": torch.__version__, "losses": losses}
        path.write_text(json.dumps(asset, indent=1) + "\n")
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: record it with `make golden`")
    want = json.loads(path.read_text())["losses"]
    got_ok = all(abs(g - w) <= REL * abs(w) for g, w in zip(losses, want, strict=True))
    assert got_ok, mismatch_report(name, losses, want)


@pytest.fixture(scope="module")
def pretrain_run(demo_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("golden") / "pretrain"
    cli("llada-pretrain", [f"run_dir={run_dir}", f"data.path={demo_data / 'shards'}",
                           f"data.tokenizer={demo_data / 'tokenizer.json'}", *RUNS["pretrain"]])
    return run_dir


def test_pretrain_losses_match_the_golden_curve(pretrain_run):
    check_or_record("pretrain", pretrain_run)


def test_sft_losses_match_the_golden_curve(pretrain_run, demo_data, tmp_path):
    run_dir = tmp_path / "sft"
    cli("llada-sft", [f"run_dir={run_dir}", f"init_from={pretrain_run / 'export'}",
                      f"data.path={demo_data / 'sft'}", f"data.tokenizer={demo_data / 'tokenizer.json'}",
                      *RUNS["sft"]])
    check_or_record("sft", run_dir)


def test_the_report_names_the_first_mismatching_steps():
    want = [5.0, 4.0, 3.0]
    text = mismatch_report("pretrain", [5.0, 4.1, 3.0], want)
    assert "    2    4.0000000    4.1000000   2.50e-02" in text and "    3 " not in text
