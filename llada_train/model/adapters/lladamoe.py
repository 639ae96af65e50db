"""LLaDA-MoE (``LLaDAMoEModelLM``: LLaDA-MoE-7B-A1B Base/Instruct) <-> our released layout.

Llama-style attention names with per-head ``q_norm``/``k_norm``, a softmax router
(``mlp.gate``) with an ``mlp.expert_bias`` buffer, one tensor per expert
(``mlp.experts.{e}.*``) and the shared expert at the layer (``shared_expert.*``). The Hub
config ships ``model_type: "llada"`` (users are told to overwrite it): ``is_lladamoe_config``
recognises the family by its expert fields instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llada_train.errors import LladaError
from llada_train.model.adapters.base import StateDictAdapter, common_config
from llada_train.model.adapters.llada2_moe import (
    check_moe_experts,
    config_read,
    stack_experts,
    unstack_experts,
)
from llada_train.model.config import ModelConfig

LAYER = "model.layers.{}."


def is_lladamoe_config(hf: dict[str, Any]) -> bool:
    """A LLaDA-MoE config.json whatever its ``model_type`` says (its expert fields)."""
    return "expert_intermediate_size" in hf and "moe_layer_freq" in hf


class LLaDAMoEAdapter(StateDictAdapter):
    """LLaDA-MoE names; experts stacked; the shared expert as the block's MLP."""

    family = "lladamoe"
    model_types = ("lladamoe", "llada_moe")
    name_map = {
        "model.embed_tokens.weight": "wte.weight",
        "model.norm.weight": "ln_f.weight",
        "lm_head.weight": "ff_out.weight",
        LAYER + "input_layernorm.weight": "blocks.{}.attn_norm.weight",
        LAYER + "self_attn.q_proj.weight": "blocks.{}.q_proj.weight",
        LAYER + "self_attn.k_proj.weight": "blocks.{}.k_proj.weight",
        LAYER + "self_attn.v_proj.weight": "blocks.{}.v_proj.weight",
        LAYER + "self_attn.o_proj.weight": "blocks.{}.attn_out.weight",
        LAYER + "self_attn.q_norm.weight": "blocks.{}.q_norm.weight",
        LAYER + "self_attn.k_norm.weight": "blocks.{}.k_norm.weight",
        LAYER + "post_attention_layernorm.weight": "blocks.{}.ff_norm.weight",
        LAYER + "mlp.gate_proj.weight": "blocks.{}.ff_proj.weight",  # dense layers first
        LAYER + "mlp.up_proj.weight": "blocks.{}.up_proj.weight",
        LAYER + "mlp.down_proj.weight": "blocks.{}.ff_out.weight",
        LAYER + "shared_expert.gate_proj.weight": "blocks.{}.ff_proj.weight",
        LAYER + "shared_expert.up_proj.weight": "blocks.{}.up_proj.weight",
        LAYER + "shared_expert.down_proj.weight": "blocks.{}.ff_out.weight",
        LAYER + "mlp.gate.weight": "blocks.{}.moe.router.weight",
        LAYER + "mlp.expert_bias": "blocks.{}.moe.router.expert_bias",
        LAYER + "mlp.experts.gate_proj": "blocks.{}.moe.gate_proj",
        LAYER + "mlp.experts.up_proj": "blocks.{}.moe.up_proj",
        LAYER + "mlp.experts.down_proj": "blocks.{}.moe.down_proj",
    }

    def __init__(self, source: str = "checkpoint", per_expert: bool = True) -> None:
        super().__init__(source)
        self.per_expert = per_expert
        self.cfg: ModelConfig | None = None

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """LLaDA-MoE's config.json; refuses what the released block does that ours does not."""
        if hf.get("attention_bias"):
            raise LladaError(
                f"{self.source}: attention_bias=true (q/k/v/o biases) is not supported"
            )
        if hf.get("clip_qkv") is not None:
            raise LladaError(f"{self.source}: clip_qkv={hf['clip_qkv']} is not supported; use null")
        experts = int(hf.get("num_experts") or 0)
        freq = [int(f) for f in hf.get("moe_layer_freq") or []]
        first_moe = freq.index(1) if 1 in freq else len(freq)
        if freq and freq != [0] * first_moe + [1] * (len(freq) - first_moe):
            raise LladaError(
                f"{self.source}: moe_layer_freq={freq} interleaves dense and MoE layers; ours "
                "keeps dense layers first (first_k_dense_replace) only"
            )
        width = int(hf.get("expert_intermediate_size") or 0)
        dense = int(hf.get("dense_intermediate_size") or 0)
        partial = hf.get("partial_rotary_factor")
        base = {k: v for k, v in hf.items() if k != "partial_rotary_factor"}
        base["intermediate_size"] = dense if dense > 0 else width  # unused when all routed
        cfg = common_config(base, self.source)
        self.cfg = dataclasses.replace(
            cfg,
            qk_norm=bool(hf.get("qk_layernorm")),
            partial_rotary_factor=float(partial) if partial not in (None, -1) else 1.0,
            num_experts=experts,
            num_experts_per_tok=int(hf.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=width if experts else 0,
            shared_expert_intermediate_size=max(
                int(hf.get("shared_expert_intermediate_size") or 0), 0
            ),
            first_k_dense_replace=first_moe if freq else 0,
            router="lladamoe",
        )
        return self.cfg

    def to_ours(self, hf: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
        """Our state dict: experts stacked and checked against the config."""
        cfg = config_read(self.cfg, self.source)
        hf = stack_experts(hf, cfg.num_experts, self.source) if cfg.num_experts else hf
        ours = super().to_ours(hf, tied)
        check_moe_experts(ours, cfg, self.source)
        return ours

    def from_ours(self, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The released layout (per-expert tensors unless ``per_expert=False``)."""
        cfg = config_read(self.cfg, self.source)
        hf = super().from_ours(ours)
        for i in range(cfg.n_layers):
            if cfg.is_moe_layer(i):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    name = f"{LAYER.format(i)}mlp.{proj}.weight"
                    if name in hf:
                        hf[f"{LAYER.format(i)}shared_expert.{proj}.weight"] = hf.pop(name)
        return unstack_experts(hf) if self.per_expert else hf
