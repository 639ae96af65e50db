"""Build the model for a run: fresh init or a released-layout folder, ZeRO-3 aware."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from llada_train.model.checkpoint import (
    check_weights,
    load_weights_into,
    named_weights,
    read_config,
)
from llada_train.model.config import ModelConfig
from llada_train.model.lora import PeftConfig, apply_lora, lora_enabled
from llada_train.model.transformer import LLaDAModel

# Training switches that a run may set on top of a pretrained folder's architecture; none of
# them is written to the exported config.json.
RUNTIME_FIELDS = (
    "attention_backend",
    "activation_checkpointing",
    "checkpoint_every",
    "checkpoint_policy",
    "compile",
    "compile_backend",
    "router_bias_update_rate",  # MoE balancing rate (model/moe.py)
    "moe_impl",  # MoE expert kernel: auto, grouped_mm or loop
)


def resolve_model_config(model_cfg: ModelConfig, init_from: str | None) -> ModelConfig:
    """The architecture: from ``init_from``'s config.json when given, else the run's preset."""
    if not init_from:
        return model_cfg
    pretrained = read_config(init_from)
    return dataclasses.replace(pretrained, **{k: getattr(model_cfg, k) for k in RUNTIME_FIELDS})


def check_init_from(model_cfg: ModelConfig, init_from: str) -> None:
    """``init_from``'s safetensors against the architecture, reading headers only: a missing,
    corrupt or mismatched file is found in seconds, before any process group."""
    with torch.device("meta"):
        model = LLaDAModel(model_cfg)
    check_weights(init_from, {n: tuple(p.shape) for n, p in named_weights(model)})


def _param_context(zero_stage: int) -> Callable[[torch.nn.Parameter], Any] | None:
    if zero_stage != 3:
        return None
    import deepspeed

    # modifier_rank=0: rank 0's values are broadcast into every partition on exit.
    return lambda p: deepspeed.zero.GatheredParameters([p], modifier_rank=0)


def build_model(
    model_cfg: ModelConfig,
    zero_stage: int,
    ds_config: dict[str, Any],
    seed: int,
    init_from: str | None,
    peft: PeftConfig | None = None,
) -> LLaDAModel:
    """Construct the model; under ZeRO-3 parameters are partitioned as they are created.

    Weights come from ``init_from`` (copied one tensor at a time, never the whole model on a
    rank under ZeRO-3) or from a seeded init identical on every rank and ZeRO stage. With
    ``peft=lora`` LoRA adapters are injected next (the base is frozen; under ZeRO-3 the new
    adapter weights are partitioned by ``deepspeed.initialize``). With ``model.compile`` the
    blocks are compiled last, once the weights and adapters are in place.
    """
    if zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        model = LLaDAModel(model_cfg)
    param_context = _param_context(zero_stage)
    if init_from:
        load_weights_into(model, init_from, param_context)
    else:
        model.init_weights(torch.Generator().manual_seed(seed), param_context)
    if lora_enabled(peft):
        apply_lora(model, peft, init_from, seed)
    if model_cfg.compile:
        model.compile_blocks(model_cfg.compile_backend)
    return model
