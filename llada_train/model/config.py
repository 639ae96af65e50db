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
    # "sdpa" (default, any device) or "flash" (flash-attn on CUDA; falls back to SDPA elsewhere);
    # "flex": block-diffusion passes (objective=block) use torch's compiled flex_attention with
    # the block rule as a BlockMask (skips masked tiles; GPU), other passes SDPA. Read when built
    # (flash) or per pass (flex)
    attention_backend: str = "sdpa"
    # recompute blocks in backward: trades up to ~30% compute for activation memory
    activation_checkpointing: bool = False
    # with activation_checkpointing: checkpoint blocks 0, k, 2k, ... (1 = every block)
    checkpoint_every: int = 1
    # "full": recompute the whole block; "save_matmuls": keep matmul/attention outputs and
    # recompute only the element-wise ops (torch selective checkpointing)
    checkpoint_policy: str = "full"
    # torch.compile each block (nn.Module.compile: parameter names unchanged); off on CPU
    compile: bool = False
    compile_backend: str = "inductor"  # "aot_eager" compiles without code generation (tests)
    # causal attention: the autoregressive twin (objective=ar); written to config.json as an
    # extra flag, released configs without it load as bidirectional
    causal: bool = False
    # biases on q/k/v only (Qwen2-family conversions); the released field of the same name
    include_qkv_bias: bool = False
    # position i outputs the prediction made at position i-1 (an AR model's next-token head
    # reused for diffusion, as Dream-7B does); every loss and sampler then reads logits[i]
    # as the prediction of token i, unchanged
    shift_logits: bool = False
    # block diffusion (BD3-LM / LLaDA 2.0): > 0 makes plain forward passes block-causal with
    # blocks of this size (the inference mask of a block model); 0 = full bidirectional.
    # Training passes their own (curriculum) block size; config.json records it as an extra
    block_size: int = 0

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
        if self.attention_backend not in ("sdpa", "flash", "flex"):
            raise LladaError(
                f"model config: attention_backend={self.attention_backend!r}; use 'sdpa', 'flash' "
                "or 'flex'"
            )
        if self.block_size < 0:
            raise LladaError(f"model config: block_size={self.block_size}; use 0 (no blocks) or > 0")
        if self.checkpoint_every < 1:
            raise LladaError(f"model config: checkpoint_every={self.checkpoint_every} must be >= 1")
        if self.checkpoint_policy not in ("full", "save_matmuls"):
            raise LladaError(
                f"model config: checkpoint_policy={self.checkpoint_policy!r}; "
                "use 'full' or 'save_matmuls'"
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
            "include_qkv_bias": self.include_qkv_bias,
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
            # extra flags, not in the released file (which therefore loads as false)
            "causal": self.causal,
            "shift_logits": self.shift_logits,
            "block_size": self.block_size,
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
        if data.get("n_kv_heads") is None and data.get("n_heads") is not None:
            kwargs["n_kv_heads"] = data["n_heads"]  # OLMo's null: as many kv heads as heads
        if "bos_token_id" not in kwargs:
            kwargs["bos_token_id"] = 0
        missing = [k for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size") if k not in kwargs or kwargs[k] is None]
        if missing:
            raise LladaError(f"{source}: missing required fields {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
