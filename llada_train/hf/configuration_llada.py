"""Hugging Face config for LLaDA exports: reads the released ``config.json`` fields as they are.

Self-contained (imports only ``transformers``): llada-train copies this file into every export
folder, where ``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` loads it.
Works with transformers 4.4x-4.5x and 5.x (a plain ``__init__`` with keyword defaults).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    """Shape and special ids of a LLaDA mask predictor, under the released (OLMo-style) names.

    Keys this class does not use (``alibi``, ``init_fn``, ``precision``, ... in the released
    files) are kept as attributes, so a load/save round trip keeps every field.
    """

    model_type = "llada"
    # the standard names generic tooling asks for (device maps, PEFT, vLLM) -> released names
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_layers: int = 32,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        mlp_hidden_size: int = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = None,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        max_sequence_length: int = 4096,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        bos_token_id: int | None = None,  # the released config.json has none
        init_std: float = 0.02,
        include_bias: bool = False,
        include_qkv_bias: bool = False,  # Qwen2-family conversions (llada-convert)
        causal: bool = False,  # llada-train's autoregressive twin
        shift_logits: bool = False,  # row i holds the prediction made at i-1 (AR adaptation)
        block_size: int = 0,  # > 0: a block-diffusion model; attention is block-causal
        head_dim: int | None = None,  # per-head width; None = d_model / n_heads
        qk_norm: bool = False,  # RMSNorm over each head's q and k before RoPE (Qwen3)
        rope_scaling_params: dict[str, Any] | None = None,  # linear/llama3/yarn; None = plain
        weight_tying: bool = False,
        **kwargs: Any,
    ) -> None:
        if weight_tying:
            raise ValueError("LLaDAConfig: weight_tying=true is not a LLaDA layout (untied head)")
        if include_bias:
            raise ValueError("LLaDAConfig: include_bias=true (biases beyond q/k/v) is not supported")
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        # OLMo configs write null for "same as n_heads"
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        # OLMo may pad the embedding past the tokenizer; the weights have embedding_size rows
        self.embedding_size = embedding_size or vocab_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_sequence_length = max_sequence_length
        self.mask_token_id = mask_token_id
        self.init_std = init_std
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.causal = causal
        self.shift_logits = shift_logits
        self.block_size = int(block_size or 0)
        self.qk_norm = bool(qk_norm)
        # not "rope_scaling": transformers 5 turns that name into its own rope_parameters
        self.rope_scaling_params = rope_scaling_params
        self.weight_tying = weight_tying
        # transformers 4.x's base pops the token ids it knows; 5.x's keeps unknown kwargs as-is
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        # set after the base: neither major version may reset them, whatever it does with kwargs
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (
            pad_token_id,
            bos_token_id,
            eos_token_id,
        )
        if (self.d_model % self.n_heads and not head_dim) or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LLaDAConfig: d_model={d_model}, n_heads={n_heads}, n_kv_heads={self.n_kv_heads} "
                "must divide evenly"
            )
        # an attribute, not a property, so that saving writes it (Qwen3 widths differ)
        self.head_dim = int(head_dim) if head_dim else self.d_model // self.n_heads
