"""Llama family (``LlamaForCausalLM``) <-> our released layout."""

from __future__ import annotations

from typing import Any

from llada_train.errors import LladaError
from llada_train.model.adapters.base import StateDictAdapter, common_config
from llada_train.model.config import ModelConfig

LAYER = "model.layers.{}."


class LlamaAdapter(StateDictAdapter):
    """Llama names; the block is ours exactly (pre-norm RMSNorm, rotate-half RoPE, SwiGLU)."""

    family = "llama"
    model_types = ("llama",)
    name_map = {
        "model.embed_tokens.weight": "wte.weight",
        "model.norm.weight": "ln_f.weight",
        "lm_head.weight": "ff_out.weight",
        LAYER + "input_layernorm.weight": "blocks.{}.attn_norm.weight",
        LAYER + "self_attn.q_proj.weight": "blocks.{}.q_proj.weight",
        LAYER + "self_attn.k_proj.weight": "blocks.{}.k_proj.weight",
        LAYER + "self_attn.v_proj.weight": "blocks.{}.v_proj.weight",
        LAYER + "self_attn.o_proj.weight": "blocks.{}.attn_out.weight",
        LAYER + "post_attention_layernorm.weight": "blocks.{}.ff_norm.weight",
        LAYER + "mlp.gate_proj.weight": "blocks.{}.ff_proj.weight",
        LAYER + "mlp.up_proj.weight": "blocks.{}.up_proj.weight",
        LAYER + "mlp.down_proj.weight": "blocks.{}.ff_out.weight",
    }

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """Llama's config.json; refuses biases (``attention_bias`` also biases o_proj)."""
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise LladaError(
                    f"{self.source}: {key}=true is not supported (our Llama block has no "
                    "biases beyond Qwen2's q/k/v); convert a checkpoint without them"
                )
        return common_config(hf, self.source)
