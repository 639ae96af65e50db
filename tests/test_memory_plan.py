"""scripts/memory_plan.py (the README's what-fits-where table) against hand arithmetic."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import yaml

from llada_train.model.config import ModelConfig
from llada_train.model.transformer import count_parameters
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("memory_plan", REPO / "scripts" / "memory_plan.py")
memory_plan = importlib.util.module_from_spec(_spec)
sys.modules["memory_plan"] = memory_plan  # dataclasses look their module up by name
_spec.loader.exec_module(memory_plan)


@pytest.mark.parametrize("preset", ["llada_1b", "llada_8b", "tiny"])
def test_parameter_count_equals_the_model(preset):
    shape = memory_plan.Shape.from_yaml(REPO / "conf" / "model" / f"{preset}.yaml")
    fields = yaml.safe_load((REPO / "conf" / "model" / f"{preset}.yaml").read_text())
    assert shape.params == count_parameters(ModelConfig(**fields))


def test_model_states_by_zero_stage_for_8b_on_8_gpus():
    n = 8_015_581_184  # the released 8B
    # 16 bytes/param unsharded; ZeRO-1 shards master+m+v (12), ZeRO-2 also grads (14), ZeRO-3 all
    expected = {0: 16 * n, 1: 4 * n + 12 * n / 8, 2: 2 * n + 14 * n / 8, 3: 16 * n / 8}
    for stage, nbytes in expected.items():
        assert memory_plan.model_states_gb(n, stage, 8) == pytest.approx(nbytes / 1e9)
    assert round(memory_plan.model_states_gb(n, 3, 8)) == 16  # PERF.md: 16 GB per GPU


def test_full_logits_loss_at_micro_batch_4_is_29_gb_and_a_chunk_is_far_less():
    s = memory_plan.Shape.from_yaml(REPO / "conf" / "model" / "llada_1b.yaml")
    # 4 x 4096 x 126,464 logits: bf16 (2) + fp32 copy, log-softmax and grad (3 x 4) bytes
    assert memory_plan.loss_gb(s, 4096, 4, None) == pytest.approx(14 * 4 * 4096 * 126464 / 1e9)
    assert memory_plan.loss_gb(s, 4096, 4, 1024) == pytest.approx(12 * 1024 * 126464 / 1e9)


def test_lora_parameters_are_r_times_in_plus_out_of_the_targeted_linears():
    """The table's LoRA count against the tiny model's own Linears that the targets select."""
    from llada_train.model import LLaDAModel
    from llada_train.model.lora import resolve_targets

    fields = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    model = LLaDAModel(ModelConfig(**fields))
    modules = dict(model.named_modules())
    targets = memory_plan.lora_targets()
    assert targets == ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
    for r, extra in ((8, []), (3, [memory_plan.HEAD])):
        chosen = resolve_targets(model, targets + extra)
        expected = sum(r * (modules[n].in_features + modules[n].out_features) for n in chosen)
        shape = memory_plan.Shape.from_yaml(REPO / "conf" / "model" / "tiny.yaml")
        assert memory_plan.lora_params(shape, r, targets + extra) == expected


def test_vrpo_8b_lora_r128_zero3_row_by_hand():
    """LLaDA-8B, 8 GPUs, ZeRO-3, LoRA r=128 on the 7 block Linears, seq 4096, 8 ELBO samples.

    N = 8,015,581,184; d = 4096, F = 12288, V = 126464, 32 blocks.
    LoRA: 128 x (4 x (4096 + 4096) + 3 x (4096 + 12288)) = 10,485,760 per block, x 32 =
      335,544,320 parameters.
    policy: base 2N / 8 = 2,003,895,296 B + the frozen head kept gathered, 2 d V x 7/8 =
      2 x 517,996,544 x 7/8 = 906,493,952 B + adapters 16 x 335,544,320 / 8 = 671,088,640 B
      = 3,581,477,888 B.
    frozen_copy: 2N = 16,031,162,368 B on every rank; lora_base: 0.
    1 pair = 2 x 8 = 16 sequences, each 32 x 2 d L (block inputs) + L (10 d + 4 d + 6 F) (one
      block recomputed) = 1,073,741,824 + 536,870,912 = 1,610,612,736 B: 25,769,803,776 B;
      the loss chunk 12 x 1024 x V = 1,553,989,632 B.
    lora_base:   1.1 x (3,581,477,888 + 25,769,803,776 + 1,553,989,632) = 33,995,798,426 B
    frozen_copy: 1.1 x (that sum + 16,031,162,368)                      = 51,630,077,030 B
    Each more pair: 1.1 x 25,769,803,776 = 28,346,784,154 B. Of 95% of 80 GB (76 GB):
    lora_base fits 2 pairs (62.3 GB; 3: 90.7), frozen_copy 1 (2: 80.0).
    """
    s = memory_plan.Shape.from_yaml(REPO / "conf" / "model" / "llada_8b.yaml")
    assert memory_plan.lora_params(s, 128, memory_plan.lora_targets()) == 335_544_320
    assert memory_plan.post_states_gb(s, 3, 8, 128, "lora_base") == pytest.approx(
        (3_581_477_888 / 1e9, 0.0))
    assert memory_plan.post_states_gb(s, 3, 8, 128, "frozen_copy")[1] == pytest.approx(16.031162368)
    args = (s, 3, 8, 4096, 1, 128)
    assert memory_plan.post_plan(*args, "lora_base", 8, 1024) == pytest.approx(33.995798426)
    assert memory_plan.post_plan(*args, "frozen_copy", 8, 1024) == pytest.approx(51.630077030)
    fits = {ref: memory_plan.largest_pairs(s, 3, 8, 4096, 128, ref, 8, 1024, 80)
            for ref in ("lora_base", "frozen_copy")}
    assert fits == {"lora_base": "2", "frozen_copy": "1"}
