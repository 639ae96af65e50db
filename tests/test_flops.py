"""FLOPs per token (the MFU numerator) against hand arithmetic for the shipped presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llada_train.model import ModelConfig, count_parameters
from llada_train.train.metrics import flops_per_token, non_embedding_parameters

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))


def test_llada_1b_at_4096_by_hand():
    cfg = preset("llada_1b")
    # d 2048, 22 layers, 32 heads / 4 kv heads of dim 64, MLP 5634, vocab 126464
    attn = 2048 * 64 * (2 * 32 + 2 * 4)  # q, out: 32 heads; k, v: 4 heads = 9,437,184
    mlp = 3 * 2048 * 5634  # gate, up, down = 34,615,296
    norms = 2 * 2048
    head = 2048 * 126464 + 2048  # output head + ln_f = 259,000,320
    non_emb = 22 * (attn + mlp + norms) + head
    assert non_emb == 1_228_244_992
    assert non_embedding_parameters(cfg) == non_emb
    attention = 12 * 22 * 2048 * 4096  # 2,214,592,512
    assert 6 * non_emb + attention == 9_584_062_464
    assert flops_per_token(cfg, 4096) == pytest.approx(9.584062464e9, rel=1e-12)


def test_llada_8b_at_4096_by_hand():
    cfg = preset("llada_8b")
    # d 4096, 32 layers, 32 heads = 32 kv heads of dim 128, MLP 12288, vocab 126464
    attn = 4 * 4096 * 4096  # q, k, v, out = 67,108,864
    mlp = 3 * 4096 * 12288  # 150,994,944
    norms = 2 * 4096
    head = 4096 * 126464 + 4096  # 518,000,640
    non_emb = 32 * (attn + mlp + norms) + head
    assert non_emb == 7_497_584_640
    # the released model's 8,015,581,184 parameters = these + the embedding table
    assert non_emb + 4096 * 126464 == 8_015_581_184 == count_parameters(cfg)
    assert non_embedding_parameters(cfg) == non_emb
    attention = 12 * 32 * 4096 * 4096  # 6,442,450,944
    assert 6 * non_emb + attention == 51_427_958_784
    assert flops_per_token(cfg, 4096) == pytest.approx(51.427958784e9, rel=1e-12)


def test_attention_term_is_linear_in_sequence_length():
    cfg = preset("llada_1b")
    assert flops_per_token(cfg, 2048) == pytest.approx(flops_per_token(cfg, 4096) - 12 * 22 * 2048 * 2048)
