"""Bidirectional LLaMA-style mask predictor with the released LLaDA parameter names (SPEC §1)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llada_train.model.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled (LLaDA's order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables of shape (L, head_dim) for rotate-half (non-interleaved) RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (L, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, head_dim)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) queries or keys in fp32 and cast back."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _flash_attn_func():
    """flash-attn's kernel, or None when it is not installed (an optional GPU extra)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


class LLaDABlock(nn.Module):
    """One pre-norm block: full (non-causal) attention, then a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # SiLU gate
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)  # down projection

    def attention(
        self,
        x: torch.Tensor,  # (B, L, d)
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,  # (B, 1, 1, L) bool, True = attend
    ) -> torch.Tensor:
        cfg = self.cfg
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, L, hd)
        flash = _flash_attn_func() if cfg.attention_backend == "flash" else None
        if flash is not None and key_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
            out = out.reshape(B, L, -1)  # flash returns (B, L, H, hd)
        else:
            if cfg.n_kv_heads != cfg.n_heads:
                rep = cfg.n_heads // cfg.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
            out = out.transpose(1, 2).reshape(B, L, -1)
        return self.attn_out(out)

    def forward(self, x, cos, sin, key_mask):
        h = x + self.attention(self.attn_norm(x), cos, sin, key_mask)
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDAModel(nn.Module):
    """The mask predictor: ``logits = model(input_ids, attention_mask)``, shape (B, L, V).

    Parameter names equal the released checkpoint's (``model.transformer.*``), so import and
    export are plain copies.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.d_model),
                "blocks": nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
                "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
                "ff_out": nn.Linear(cfg.d_model, cfg.vocab_size, bias=False),
            }
        )
        self.model = nn.Module()
        self.model.transformer = transformer
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, param_context=None) -> None:
        """Normal(0, init_std) matrices (residual outputs / sqrt(2 n_layers)), unit norm weights.

        Draws happen in parameter order from ``generator``, so every ZeRO stage gets the same
        weights; ``param_context(p)`` wraps each write (ZeRO-3 passes a gather context).
        """
        std = self.config.init_std
        for name, p in self.named_parameters():
            with param_context(p) if param_context else contextlib.nullcontext():
                if p.ndim == 1:
                    p.fill_(1.0)
                    continue
                residual_out = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
                s = std / math.sqrt(2 * self.config.n_layers) if residual_out else std
                values = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, s, generator=generator)
                p.copy_(values)

    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rotary_cos_sin(seq_len, self.config.head_dim, self.config.rope_theta, device)
        return self._rope_cache[key]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) int64
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
    ) -> torch.Tensor:
        t = self.transformer
        B, L = input_ids.shape
        x = t.wte(input_ids)  # (B, L, d)
        cos, sin = self._rope(L, input_ids.device)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool().view(B, 1, 1, L)  # padding masks keys only
        for block in t.blocks:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, key_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, key_mask)
        return t.ff_out(t.ln_f(x))  # (B, L, V)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    return sum(p.numel() for p in model.parameters())
