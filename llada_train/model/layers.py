"""The block's building pieces: RMSNorm, rotary tables, attention kernels (SPEC §1)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llada_train.errors import LladaError
from llada_train.model.config import ROPE_SCALING_TYPES

# Native grouped-query attention in SDPA (``enable_gqa``) arrived in torch 2.5.
SDPA_HAS_GQA = torch.__version__ >= (2, 5)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype, then scaled (LLaDA's order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm normalises in fp32 (its op-math type for bf16/fp16) and rounds once to
        # x's dtype: LLaDA's order without an fp32 copy of x for autograd to keep where a fused
        # kernel serves (CUDA), and one node for torch.compile. The weight multiplies after
        # the cast back, as in the released model.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, float]:
    """RoPE's fp32 inverse frequencies (head_dim/2,) and the factor on cos/sin, after scaling.

    ``scaling`` is ``ModelConfig.rope_scaling_params`` (every parameter resolved by the adapter):
    ``linear`` divides all frequencies by ``factor``; ``llama3`` divides the low ones (wavelength
    above original length / low_freq_factor), keeps the high ones (below original length /
    high_freq_factor) and blends in between; ``yarn`` blends interpolated and original
    frequencies over a ramp of dimensions and scales cos/sin by ``attention_factor``. The
    arithmetic follows transformers' ``ROPE_INIT_FUNCTIONS`` op for op (fp32 tensors, float64
    Python scalars), so converted models reproduce its tables.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / theta**exponent  # (hd/2,)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":

        def correction_dim(rotations: float) -> float:
            # the dimension whose wavelength makes ``rotations`` turns over the original length
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo = correction_dim(float(scaling["beta_fast"]))
        hi = correction_dim(float(scaling["beta_slow"]))
        if scaling["truncate"]:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001  # transformers' guard against a zero-width ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: original frequency (fast dims), 0: interpolated (slow dims)
        pos_freqs = theta**exponent
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
        return inv_freq, float(scaling["attention_factor"])
    raise LladaError(f"rope_scaling_params: rope_type {kind!r} is not one of {ROPE_SCALING_TYPES}")


def rotary_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables of shape (L, head_dim) for rotate-half (non-interleaved) RoPE;
    ``scaling`` (``ModelConfig.rope_scaling_params``) rescales the frequencies (see ``rope_inv_freq``)."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
    inv_freq = inv_freq.to(device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (L, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, head_dim)
    if attention_factor != 1.0:  # yarn: scales q.k by attention_factor**2, as transformers does
        return emb.cos() * attention_factor, emb.sin() * attention_factor
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) queries or keys in fp32 and cast back.

    Tables narrower than D (partial RoPE, ``partial_rotary_factor`` < 1) rotate the first
    ``cos.shape[-1]`` features; the rest pass through unchanged."""
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :width], cos, sin), x[..., width:]), dim=-1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class RopeTable:
    """One fp32 cos/sin table per device, built on first use and sliced for every length.

    The table covers ``max_len`` positions (rebuilt longer only if a longer input comes), so
    the 1% length cut and padded batches reuse it instead of caching one table per length.
    It is a plain attribute, not a buffer: checkpoints get no new keys, ``model.to(bf16)``
    cannot round it, and a model built on the meta device or under ZeRO-3 ``zero.Init``
    builds it on the real device at its first forward pass.
    """

    def __init__(
        self, head_dim: int, theta: float, max_len: int, scaling: dict[str, Any] | None = None
    ) -> None:
        self.head_dim, self.theta, self.max_len = head_dim, theta, max_len
        self.scaling = scaling  # ModelConfig.rope_scaling_params: {} or None = plain RoPE
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, start: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions [start, start + length): two (length, head_dim) fp32 views."""
        end = start + length
        table = self.tables.get(device)
        if table is None or table[0].shape[0] < end:
            # Built outside inference mode so a table first made while sampling can still be
            # saved for backward by a later training step.
            with torch.inference_mode(False), torch.no_grad():
                table = rotary_cos_sin(
                    max(self.max_len, end), self.head_dim, self.theta, device, self.scaling
                )
            self.tables[device] = table
        return table[0][start:end], table[1][start:end]


FlashFn = Callable[..., torch.Tensor]

# flex_attention is compiled once per process (its eager form materialises the scores and is
# a reference only). Tests set FLEX_COMPILE = False to check masks without a compile.
FLEX_COMPILE = True
_flex_fn: Callable[..., torch.Tensor] | None = None


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """flex_attention of (B, H, Lq, hd) q over (B, H_kv, Lk, hd) k, v under a ``BlockMask``;
    returns (B, Lq, H * hd). Grouped-query attention without repeating k, v."""
    global _flex_fn
    from torch.nn.attention.flex_attention import flex_attention

    if FLEX_COMPILE and _flex_fn is None:
        _flex_fn = torch.compile(flex_attention)  # automatic dynamic shapes after a recompile
    fn = _flex_fn if FLEX_COMPILE else flex_attention
    B, H, Lq, _ = q.shape
    out = fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != H)
    return out.transpose(1, 2).reshape(B, Lq, -1)


def resolve_flash_attn(attention_backend: str) -> FlashFn | None:
    """flash-attn's kernel when asked for and installed (an optional GPU extra), else None."""
    if attention_backend != "flash":
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attend(
    q: torch.Tensor,  # (B, H, Lq, hd)
    k: torch.Tensor,  # (B, H_kv, Lk, hd)
    v: torch.Tensor,  # (B, H_kv, Lk, hd)
    key_mask: torch.Tensor | None,  # (B, 1, 1 or Lq, Lk) bool, True = attend; or a BlockMask
    flash: FlashFn | None,
    is_causal: bool = False,  # only with key_mask None and Lq == Lk (see model/masks.py)
) -> torch.Tensor:
    """Attention of q over k, v (full, or causal / masked per the layout); (B, Lq, H * hd).

    ``key_mask`` may be a flex ``BlockMask`` (``attention_backend=flex``, block diffusion)."""
    if key_mask is not None and not isinstance(key_mask, torch.Tensor):
        return flex_attend(q, k, v, key_mask)
    B, H, Lq, _ = q.shape
    half = q.dtype in (torch.float16, torch.bfloat16)
    if flash is not None and key_mask is None and q.is_cuda and half:
        # flash-attn takes (B, L, H, hd), handles H_kv < H itself and Lq != Lk (prefix cache)
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)
        return out.reshape(B, Lq, -1)
    gqa = k.shape[1] != H
    if gqa and (key_mask is not None or not SDPA_HAS_GQA):
        # SDPA's GQA runs in its flash kernel, which takes no padding mask; with a mask the
        # memory-efficient kernel needs full-head k, v, so repeat them here.
        rep = H // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    if gqa:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, is_causal=is_causal, enable_gqa=True
        )
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=is_causal)
    return out.transpose(1, 2).reshape(B, Lq, -1)  # (B, Lq, H * hd)
