"""Hugging Face model for LLaDA exports: the bidirectional mask predictor of SPEC §1.

Self-contained (imports only ``torch`` and ``transformers``): llada-train copies this file into
every export folder, where ``AutoModel.from_pretrained(folder, trust_remote_code=True)``
loads it. Parameter names equal the released checkpoint's (``model.transformer.*``), so the
export's safetensors load with no renaming. Works with transformers 4.4x-4.5x and 5.x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_llada import LLaDAConfig


class LLaDARMSNorm(nn.Module):
    """RMSNorm in fp32, cast back to the input dtype, then scaled (the released order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(
    length: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (length, head_dim) cos/sin of positions 0..length-1, halves repeated (rotate-half).

    Computed per call, not stored as a buffer: a buffer would be left on the meta device or
    rounded to bf16 by ``from_pretrained``, and the table costs next to nothing next to a layer.
    """
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    positions = torch.arange(length, device=device, dtype=torch.float32)
    angles = positions[:, None] * theta**-exponent  # (L, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, hd)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, L, hd) in fp32 (non-interleaved halves), cast back."""
    xf = x.float()
    first, second = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm block: attention (bidirectional unless ``config.causal``), then a SwiGLU MLP."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, hd, mlp = config.d_model, config.head_dim, config.mlp_hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        qkv_bias = bool(getattr(config, "include_qkv_bias", False))
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, mlp, bias=False)  # gate (SiLU)
        self.up_proj = nn.Linear(d, mlp, bias=False)
        self.ff_out = nn.Linear(mlp, d, bias=False)  # down projection

    def forward(
        self,
        x: torch.Tensor,  # (B, L, d)
        cos: torch.Tensor,  # (L, hd) fp32
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,  # (B, 1, 1 or L, L) bool, True = may be attended to
        is_causal: bool = False,
    ) -> torch.Tensor:
        """The block's output (B, L, d)."""
        B, L, _ = x.shape
        a = self.attn_norm(x)
        hq, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(a).view(B, L, hq, hd).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(a).view(B, L, hkv, hd).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.v_proj(a).view(B, L, hkv, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if hkv != hq:
            # query head h reads kv head h // (hq / hkv) (grouped-query attention)
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=is_causal)
        h = x + self.attn_out(att.transpose(1, 2).reshape(B, L, hq * hd))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDATransformer(nn.Module):
    """Holds ``transformer`` (wte, blocks, ln_f, ff_out) so names read ``model.transformer.*``."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.embedding_size, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.embedding_size, bias=False),  # head
            }
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Logits (B, L, V) and, when asked, the input of every block plus the last output."""
        t, cfg = self.transformer, self.config
        B, L = input_ids.shape
        x = t.wte(input_ids)  # (B, L, d)
        cos, sin = rope_cos_sin(L, cfg.head_dim, cfg.rope_theta, input_ids.device)
        key_mask = None
        if attention_mask is not None:
            # padding hides keys only; padded queries still attend to the real keys, so their
            # (unused) outputs stay finite as long as a row has one real token
            key_mask = attention_mask.bool().view(B, 1, 1, L)
        is_causal = bool(getattr(cfg, "causal", False))
        block = int(getattr(cfg, "block_size", 0) or 0)
        if block or (is_causal and key_mask is not None):
            pos = torch.arange(L, device=input_ids.device)
            allowed = torch.ones(L, L, dtype=torch.bool, device=pos.device)
            if is_causal:
                allowed = pos[None, :] <= pos[:, None]  # (L, L): key <= query
            if block:
                # a block-diffusion model: block-causal, blocks of ``block_size`` from position
                # 0, each seeing itself and the earlier blocks (its inference mask)
                allowed = allowed & (pos[None, :] // block <= pos[:, None] // block)
            if key_mask is not None:
                allowed = allowed & key_mask
            # every position keeps itself, so a padded query never has an empty row (NaN)
            key_mask = allowed | torch.eye(L, dtype=torch.bool, device=pos.device)
            is_causal = False
        hidden: list[torch.Tensor] = []
        for block in t.blocks:
            hidden.append(x)
            x = block(x, cos, sin, key_mask, is_causal)
        hidden.append(x)
        if getattr(cfg, "shift_logits", False):
            # row i predicts token i from the AR head's output at i-1; row 0 keeps its own
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        logits = t.ff_out(t.ln_f(x))  # (B, L, V)
        return logits, tuple(hidden) if output_hidden_states else None


class LLaDAPreTrainedModel(PreTrainedModel):
    """Weight init and loading hooks shared by the LLaDA classes."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LLaDABlock"]  # device_map="auto" keeps a block on one device
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only runs for weights missing from a checkpoint (or a model built from a config);
        # nn.init functions, because transformers 5 guards them against loaded weights.
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LLaDARMSNorm):
            nn.init.ones_(module.weight)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """The mask predictor: ``model(input_ids, attention_mask).logits`` of shape (B, L, V).

    Bidirectional: every position sees every (non-padding) position. A padding
    ``attention_mask`` (1 = real token) masks keys only. A block-diffusion model
    (``config.block_size`` > 0) is block-causal: position i sees the blocks up to its own.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDATransformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) int64
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> MaskedLMOutput | tuple[torch.Tensor, ...]:
        """Logits (B, L, V) for every position (the model predicts masked ones)."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            # e.g. labels: the diffusion loss weights CE by 1/t, a plain MLM loss would mislead
            raise TypeError(f"LLaDAModelLM.forward does not take {unsupported}")
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        logits, hidden = self.model(input_ids, attention_mask, output_hidden_states)
        if return_dict is False:
            return (logits,) + ((hidden,) if hidden is not None else ())
        return MaskedLMOutput(logits=logits, hidden_states=hidden)
