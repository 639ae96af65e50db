"""Qwen2 family (``Qwen2ForCausalLM``) <-> our released layout: Llama plus q/k/v biases."""

from __future__ import annotations

from typing import Any

from llada_train.errors import LladaError
from llada_train.model.adapters.base import common_config
from llada_train.model.adapters.llama import LAYER, LlamaAdapter
from llada_train.model.config import ModelConfig


class Qwen2Adapter(LlamaAdapter):
    """Qwen2 names: Llama's, with biases on q/k/v (``include_qkv_bias``)."""

    family = "qwen2"
    model_types = ("qwen2",)
    name_map = {
        **LlamaAdapter.name_map,
        LAYER + "self_attn.q_proj.bias": "blocks.{}.q_proj.bias",
        LAYER + "self_attn.k_proj.bias": "blocks.{}.k_proj.bias",
        LAYER + "self_attn.v_proj.bias": "blocks.{}.v_proj.bias",
    }

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """Qwen2's config.json; refuses sliding-window attention, which we do not implement."""
        refuse_qwen_sliding_window(hf, self.source)
        return common_config(hf, self.source, include_qkv_bias=True)


def refuse_qwen_sliding_window(hf: dict[str, Any], source: str) -> None:
    """Qwen2/Qwen3 switch sliding windows on per layer (``use_sliding_window``, ``layer_types``)."""
    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
        raise LladaError(
            f"{source}: use_sliding_window=true is not implemented (full attention "
            "only); convert a checkpoint with use_sliding_window=false"
        )
