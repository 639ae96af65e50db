"""The block's building pieces: RMSNorm, rotary tables, attention kernels (SPEC §1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables of shape (L, head_dim) for rotate-half (non-interleaved) RoPE."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / theta**exponent
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


class RopeTable:
    """One fp32 cos/sin table per device, built on first use and sliced for every length.

    The table covers ``max_len`` positions (rebuilt longer only if a longer input comes), so
    the 1% length cut and padded batches reuse it instead of caching one table per length.
    It is a plain attribute, not a buffer: checkpoints get no new keys, ``model.to(bf16)``
    cannot round it, and a model built on the meta device or under ZeRO-3 ``zero.Init``
    builds it on the real device at its first forward pass.
    """

    def __init__(self, head_dim: int, theta: float, max_len: int) -> None:
        self.head_dim, self.theta, self.max_len = head_dim, theta, max_len
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
                table = rotary_cos_sin(max(self.max_len, end), self.head_dim, self.theta, device)
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
