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
