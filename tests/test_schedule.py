"""LR schedules against hand-computed values at the phase edges (SPEC §4)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llada_train.errors import LladaError
from llada_train.train.distributed import (
    DeepSpeedConfig,
    gradient_accumulation_steps,
    render_deepspeed_config,
)
from llada_train.train.schedule import ScheduleConfig, lr_at
from tests.conftest import REPO


def paper_wsd() -> ScheduleConfig:
    raw = OmegaConf.load(REPO / "conf" / "schedule" / "wsd.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScheduleConfig), raw))


def test_wsd_paper_values_at_phase_edges():
    s = paper_wsd()
    T = 1e12
    step_far = 10_000  # past warmup
    assert lr_at(s, 0, 0, 0) == pytest.approx(4e-4 / 2000)  # first warmup step
    assert lr_at(s, 999, 0, 0) == pytest.approx(4e-4 * 1000 / 2000)
    assert lr_at(s, 1999, 0, 0) == pytest.approx(4e-4)  # warmup ends at the peak
    assert lr_at(s, step_far, 1.2 * T - 1, 0) == pytest.approx(4e-4)  # stable until 1.2T
    assert lr_at(s, step_far, 1.2 * T, 0) == pytest.approx(1e-4)  # the drop
    assert lr_at(s, step_far, 2.0 * T - 1, 0) == pytest.approx(1e-4)  # stays until 2.0T
    assert lr_at(s, step_far, 2.0 * T, 0) == pytest.approx(1e-4)  # decay starts at 2.3T - 0.3T
    assert lr_at(s, step_far, 2.15 * T, 0) == pytest.approx((1e-4 + 1e-5) / 2)  # halfway
    assert lr_at(s, step_far, 2.3 * T, 0) == pytest.approx(1e-5)  # end
    assert lr_at(s, step_far, 2.5 * T, 0) == pytest.approx(1e-5)  # stays at the floor


def test_wsd_boundaries_are_tokens_not_steps():
    s = paper_wsd()
    # the same token count gives the same rate whatever step (batch size) reached it
    assert lr_at(s, 3000, 1.5e12, 0) == lr_at(s, 300_000, 1.5e12, 0) == pytest.approx(1e-4)


def test_sft_schedule_paper_values():
    s = ScheduleConfig(name="sft", peak_lr=2.5e-5, warmup_steps=50, final_lr=2.5e-6, decay_fraction=0.1)
    max_steps = 1000  # decay over the last 100 steps: 900..999
    assert lr_at(s, 0, 0, max_steps) == pytest.approx(2.5e-5 / 50)
    assert lr_at(s, 49, 0, max_steps) == pytest.approx(2.5e-5)
    assert lr_at(s, 899, 0, max_steps) == pytest.approx(2.5e-5)
    assert lr_at(s, 900, 0, max_steps) == pytest.approx(2.5e-5 + (2.5e-6 - 2.5e-5) * 1 / 100)
    assert lr_at(s, 949, 0, max_steps) == pytest.approx(2.5e-5 + (2.5e-6 - 2.5e-5) * 50 / 100)
    assert lr_at(s, 999, 0, max_steps) == pytest.approx(2.5e-6)


def test_constant_schedule_and_unknown_name():
    s = ScheduleConfig(name="constant", peak_lr=1e-3, warmup_steps=4)
    assert [lr_at(s, i, 0, 0) for i in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    with pytest.raises(LladaError, match="schedule.name"):
        lr_at(ScheduleConfig(name="cosine"), 0, 0, 0)


def test_batch_arithmetic():
    assert gradient_accumulation_steps(1280, 4, 320) == 1
    assert gradient_accumulation_steps(256, 2, 8) == 16
    with pytest.raises(LladaError, match="not a multiple"):
        gradient_accumulation_steps(10, 4, 2)
    ds = render_deepspeed_config(DeepSpeedConfig(zero_stage=3), 32, 4, 2, 1.0, bf16=False)
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 3
    tuned = DeepSpeedConfig(zero_stage=3, stage3_max_live_parameters=7, stage3_max_reuse_distance=5, sub_group_size=3)
    zero = render_deepspeed_config(tuned, 32, 4, 2, 1.0, bf16=False)["zero_optimization"]
    assert (zero["stage3_max_live_parameters"], zero["stage3_max_reuse_distance"], zero["sub_group_size"]) == (7, 5, 3)
    with pytest.raises(LladaError, match="offload_param"):
        render_deepspeed_config(DeepSpeedConfig(zero_stage=2, offload_param=True), 8, 4, 2, 1.0, False)


def test_grad_accum_dtype_is_rendered_only_when_set():
    plain = render_deepspeed_config(DeepSpeedConfig(zero_stage=2), 32, 4, 2, 1.0, bf16=True)
    assert "data_types" not in plain  # null: DeepSpeed's default (the model's dtype)
    fp32 = render_deepspeed_config(
        DeepSpeedConfig(zero_stage=2, grad_accum_dtype="fp32"), 32, 4, 2, 1.0, bf16=True
    )
    assert fp32["data_types"] == {"grad_accum_dtype": "fp32"} and fp32["bf16"] == {"enabled": True}
    assert {k: v for k, v in fp32.items() if k != "data_types"} == plain
    with pytest.raises(LladaError, match="grad_accum_dtype=fp32 with bf16 needs deepspeed.zero_stage >= 1"):
        render_deepspeed_config(DeepSpeedConfig(grad_accum_dtype="fp32"), 8, 4, 2, 1.0, bf16=True)
    with pytest.raises(LladaError, match="use null or fp32"):
        render_deepspeed_config(DeepSpeedConfig(zero_stage=1, grad_accum_dtype="fp16"), 8, 4, 2, 1.0, True)
