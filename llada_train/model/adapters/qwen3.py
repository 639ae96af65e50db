"""Qwen3 family (``Qwen3ForCausalLM``) <-> our released layout: Llama plus per-head q/k norm."""

from __future__ import annotations

import dataclasses
from typing import Any

from llada_train.model.adapters.llama import LAYER, LlamaAdapter
from llada_train.model.adapters.qwen2 import refuse_qwen_sliding_window
from llada_train.model.config import ModelConfig


class Qwen3Adapter(LlamaAdapter):
    """Qwen3 names: Llama's plus ``q_norm``/``k_norm`` (RMSNorm over each head before RoPE);
    the head width is explicit (``head_dim``, often not hidden_size / heads)."""

    family = "qwen3"
    model_types = ("qwen3",)
    name_map = {
        **LlamaAdapter.name_map,
        LAYER + "self_attn.q_norm.weight": "blocks.{}.q_norm.weight",
        LAYER + "self_attn.k_norm.weight": "blocks.{}.k_norm.weight",
    }

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """Qwen3's config.json; ``attention_bias`` (q/k/v and o_proj) and sliding windows are
        refused as for Llama and Qwen2."""
        refuse_qwen_sliding_window(hf, self.source)
        return dataclasses.replace(super().model_config(hf), qk_norm=True)
