"""Model hyper-parameters and their mapping to the released LLaDA ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llada_train.errors import LladaError

# RoPE scalings the rotary table computes (``layers.rope_inv_freq``) and the parameters each
# needs in ``ModelConfig.rope_scaling_params`` (all resolved: no implicit defaults)
ROPE_SCALING_TYPES: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
        "attention_factor",
    ),
}  # fmt: skip


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
    # per-head width when it is not d_model / n_heads (Qwen3, Mistral Nemo); 0 = d_model / n_heads.
    # config.json writes the width in effect as "head_dim"
    head_dim_override: int = 0
    # RMSNorm over each head's q and k before RoPE (Qwen3; LLaDA 2.x): weights
    # blocks.{i}.q_norm / k_norm of shape (head_dim,)
    qk_norm: bool = False
    # RoPE frequency scaling, transformers' rope_scaling with every parameter resolved
    # ({"rope_type": "llama3" | "linear" | "yarn", ...}: see ROPE_SCALING_TYPES); {} = plain
    # (a dict, not None: OmegaConf cannot merge a command-line dict into a null node)
    rope_scaling_params: dict[str, Any] = field(default_factory=dict)
    # RoPE rotates the first head_dim x partial_rotary_factor features of each head, with
    # frequencies over that width (LLaDA 2.x: 0.5); the rest pass unrotated
    partial_rotary_factor: float = 1.0
    # ---- mixture of experts (LLaDA-MoE, LLaDA 2.x; model/moe.py); 0 experts = dense ------------
    num_experts: int = 0  # routed experts per MoE layer
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # d_ff of one routed expert
    # d_ff of the shared expert (the block's own ff_proj/up_proj/ff_out in MoE layers); 0 = none
    shared_expert_intermediate_size: int = 0
    first_k_dense_replace: int = 0  # layers 0..k-1 keep the dense MLP (mlp_hidden_size)
    router: str = "llada2"  # a key of moe.ROUTERS: "llada2" (sigmoid, groups) or "lladamoe"
    n_group: int = 1  # expert groups (llada2: top-k only inside the topk_group best groups)
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # llada2: routed weights x this
    # aux-loss-free balancing: the expert bias moves by this much per optimizer step toward
    # equal load (0 = frozen bias). A training switch: config.json does not record it
    router_bias_update_rate: float = 0.0
    # routed-expert kernel: "auto" (torch._grouped_mm where it runs, else a loop over experts),
    # "grouped_mm" or "loop". A runtime switch, not recorded
    moe_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.head_dim_override < 0:
            raise LladaError(
                f"model config: head_dim_override={self.head_dim_override}; use 0 (d_model / "
                "n_heads) or the per-head width"
            )
        if self.d_model % self.n_heads and not self.head_dim_override:
            raise LladaError(
                f"model config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise LladaError(
                f"model config: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise LladaError(f"model config: head dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling_params:
            check_rope_scaling(self.rope_scaling_params)
        self._check_rotary_and_experts()
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
        """Per-head width: ``head_dim_override`` when set, else d_model / n_heads."""
        return self.head_dim_override or self.d_model // self.n_heads

    def _check_rotary_and_experts(self) -> None:
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise LladaError(
                f"model config: partial_rotary_factor={self.partial_rotary_factor} gives a rotary "
                f"width of {self.rotary_dim} of head_dim {self.head_dim}; need a factor in (0, 1] "
                "and an even width"
            )
        if not self.num_experts:
            return
        from llada_train.model.moe import MOE_IMPLS, ROUTERS  # torch only where MoE is used

        e, k = self.num_experts, self.num_experts_per_tok
        problems = []
        if not 1 <= k <= e:
            problems.append(f"num_experts_per_tok={k} must be in [1, num_experts={e}]")
        if self.moe_intermediate_size < 1:
            problems.append(f"moe_intermediate_size={self.moe_intermediate_size} must be >= 1")
        if self.router not in ROUTERS:
            problems.append(f"router={self.router!r} is unknown (use one of {sorted(ROUTERS)})")
        if self.moe_impl not in MOE_IMPLS:
            problems.append(f"moe_impl={self.moe_impl!r} is unknown (use one of {list(MOE_IMPLS)})")
        if self.n_group < 1 or e % self.n_group:
            problems.append(f"num_experts={e} is not divisible into n_group={self.n_group} groups")
        elif not 1 <= self.topk_group <= self.n_group:
            problems.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        elif self.topk_group * (e // self.n_group) < k:
            problems.append(
                f"topk_group={self.topk_group} groups of {e // self.n_group} experts hold fewer "
                f"than num_experts_per_tok={k}"
            )
        if self.router_bias_update_rate < 0:
            problems.append(f"router_bias_update_rate={self.router_bias_update_rate} must be >= 0")
        if problems:
            raise LladaError(f"model config: {problems[0]}")

    @property
    def rotary_dim(self) -> int:
        """Features of each head that RoPE rotates (head_dim x partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        """True where layer ``layer``'s feed-forward is routed experts (after the dense ones)."""
        return self.num_experts > 0 and layer >= self.first_k_dense_replace

    def ffn_width(self, layer: int) -> int:
        """d_ff of layer ``layer``'s own SwiGLU: the dense MLP, or in a MoE layer the shared
        expert (0: none)."""
        moe = self.is_moe_layer(layer)
        return self.shared_expert_intermediate_size if moe else self.mlp_hidden_size

    def moe_json(self) -> dict[str, Any]:
        """The config.json fields of partial RoPE and experts (empty for a plain dense model)."""
        out: dict[str, Any] = {}
        if self.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = self.partial_rotary_factor
        if self.num_experts:
            for name in (
                "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "first_k_dense_replace", "router", "n_group",
                "topk_group", "routed_scaling_factor",
            ):  # fmt: skip
                out[name] = getattr(self, name)
        return out

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
            "head_dim": self.head_dim,
            "qk_norm": self.qk_norm,
            "rope_scaling_params": dict(self.rope_scaling_params) or None,
            **self.moe_json(),
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
        head_dim, d, heads = data.get("head_dim"), data.get("d_model"), data.get("n_heads")
        if head_dim and d and heads and int(head_dim) != d // heads:
            kwargs["head_dim_override"] = int(head_dim)  # only a width that differs is kept
        missing = [k for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size") if k not in kwargs or kwargs[k] is None]
        if missing:
            raise LladaError(f"{source}: missing required fields {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_rope_scaling(params: dict[str, Any], source: str = "model config") -> None:
    """Refuse a ``rope_scaling_params`` the rotary table cannot compute (type or parameters)."""
    kind = params.get("rope_type")
    needed = ROPE_SCALING_TYPES.get(kind)  # type: ignore[arg-type]
    if needed is None:
        raise LladaError(
            f"{source}: rope_scaling_params.rope_type={kind!r} is not implemented; use one of "
            f"{sorted(ROPE_SCALING_TYPES)} or null (plain RoPE)"
        )
    missing = [k for k in needed if params.get(k) is None]
    if missing:
        raise LladaError(f"{source}: rope_scaling_params ({kind}) lacks {missing}; give every one")
