"""Model hyper-parameters and their mapping to the released LLaDA ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from llada_train.errors import LladaError


@dataclass
class ModelConfig:
    """Shape of a bidirectional LLaDA transformer plus the special token ids it uses.

    Token ids are configuration (SPEC §1): a tiny model with its own tokenizer sets its own.
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_hidden_size: int = 384
    vocab_size: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 256
    mask_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 1
    bos_token_id: int = 0
    init_std: float = 0.02
    # "sdpa" (default, any device) or "flash" (flash-attn on CUDA; falls back to SDPA elsewhere)
    attention_backend: str = "sdpa"
    # recompute each block in backward: trades ~30% compute for activation memory
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise LladaError(
                f"model config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise LladaError(
                f"model config: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise LladaError("model config: head dim d_model/n_heads must be even for rotary embeddings")
        if self.attention_backend not in ("sdpa", "flash"):
            raise LladaError(
                f"model config: attention_backend={self.attention_backend!r}; use 'sdpa' or 'flash'"
            )
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise LladaError(
                    f"model config: {name}={value} is outside the vocabulary [0, {self.vocab_size})"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_llada_json(self) -> dict[str, Any]:
        """The released checkpoint's ``config.json`` fields for this model."""
        return {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "block_type": "llama",
            "activation_type": "silu",
            "layer_norm_type": "rms",
            "rope": True,
            "rope_full_precision": True,
            "include_bias": False,
            "include_qkv_bias": False,
            "weight_tying": False,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "mlp_hidden_size": self.mlp_hidden_size,
            "vocab_size": self.vocab_size,
            "embedding_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_sequence_length": self.max_sequence_length,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "init_std": self.init_std,
        }

    @classmethod
    def from_llada_json(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a released-layout ``config.json`` (extra OLMo/HF keys are ignored)."""
        if data.get("weight_tying"):
            raise LladaError(f"{source}: weight_tying=true is not a LLaDA layout (untied head expected)")
        if data.get("include_bias"):
            raise LladaError(f"{source}: include_bias=true is not supported (LLaDA has no biases)")
        vocab = data.get("embedding_size") or data.get("vocab_size")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        kwargs["vocab_size"] = vocab
        if "bos_token_id" not in kwargs:
            kwargs["bos_token_id"] = 0
        missing = [k for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size") if k not in kwargs or kwargs[k] is None]
        if missing:
            raise LladaError(f"{source}: missing required fields {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
