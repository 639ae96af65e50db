"""The AR twin through the real ``llada-pretrain`` entry point: same loop, data and export."""

from __future__ import annotations

import json

import torch

from llada_train.model import load_pretrained
from llada_train.sample import ar_generate
from tests.launch_utils import cli, metrics


def test_ar_twin_trains_exports_and_generates(demo_data, tmp_path):
    run_dir = tmp_path / "ar"
    data = [f"data.path={demo_data / 'shards'}", f"data.tokenizer={demo_data / 'tokenizer.json'}"]
    cli("llada-pretrain", [f"run_dir={run_dir}", *data, "trainer.max_steps=20",
                           "trainer.seq_len=64", "logging.log_every=1",
                           "logging.progress_bar=false", "model.causal=true", "objective=ar"])
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 20 and sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert json.loads((run_dir / "export" / "config.json").read_text())["causal"] is True
    model = load_pretrained(run_dir / "export")
    assert model.config.causal
    out = ar_generate(model, torch.tensor([[0, 5, 6]]), 4)
    assert out.tokens.shape == (1, 7) and out.nfe == 4


def test_ar_objective_refuses_bidirectional_model_in_the_cli(demo_data, tmp_path):
    data = [f"data.path={demo_data / 'shards'}", f"data.tokenizer={demo_data / 'tokenizer.json'}"]
    proc = cli("llada-pretrain", [f"run_dir={tmp_path / 'r'}", *data, "trainer.max_steps=2",
                                  "trainer.seq_len=32", "objective=ar"], check=False)
    assert proc.returncode != 0
    assert "error: objective=ar needs a causal model: set model.causal=true" in proc.stderr
