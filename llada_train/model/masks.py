"""Attention layouts: padding, causal and document (block-diagonal) masks, combined once per pass.

The model builds one layout per forward pass and every block reuses it. The plain cases keep
their fast kernels: bidirectional attention with at most a padding mask (the LLaDA default)
passes the (B, 1, 1, keys) key mask as before, and causal attention without padding,
documents or a cached prefix uses SDPA's / flash-attn's ``is_causal`` with no mask at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llada_train.errors import LladaError


@dataclass
class AttentionLayout:
    """What every block's attention receives: a boolean mask (True = attend) or a causal flag."""

    mask: torch.Tensor | None  # (B or 1, 1, 1 or Lq, keys) bool, or None
    is_causal: bool = False  # SDPA/flash ``is_causal``; only with mask None and Lq == keys


def attention_layout(
    batch: int,
    length: int,  # Lq: positions run in this pass
    offset: int,  # cached positions before them (keys = offset + length)
    attention_mask: torch.Tensor | None,  # (B, keys), 1 = real token
    document_ids: torch.Tensor | None,  # (B, length) int, equal ids attend to each other
    causal: bool,
    device: torch.device,
) -> AttentionLayout:
    """The attention layout of one pass (shapes checked, one line on a mismatch)."""
    keys = offset + length
    key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask.bool().view(batch, 1, 1, keys)  # padding masks keys only
    if document_ids is not None:
        if offset:
            raise LladaError(
                "model: document_ids cannot be combined with a filled PrefixCache; "
                "run packed windows without a cache"
            )
        if tuple(document_ids.shape) != (batch, length):
            raise LladaError(
                f"model: document_ids has shape {tuple(document_ids.shape)}; "
                f"expected (B, L) = {(batch, length)}, one id per input position"
            )
    if not causal and document_ids is None:
        return AttentionLayout(key_mask)  # LLaDA's bidirectional attention, unchanged
    if causal and document_ids is None and key_mask is None and offset == 0:
        return AttentionLayout(None, is_causal=True)
    q_pos = torch.arange(offset, keys, device=device)[:, None]  # (Lq, 1) absolute positions
    k_pos = torch.arange(keys, device=device)[None, :]  # (1, keys)
    allowed = torch.ones(1, 1, length, keys, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (k_pos <= q_pos)  # (1, 1, Lq, keys)
    if document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, L, L)
        allowed = allowed & same[:, None]  # (B, 1, L, L)
    if key_mask is not None:
        allowed = allowed & key_mask
    # Every query may always see itself: a padding query (left padding under a causal mask,
    # or a pad "document") would otherwise have no key at all, SDPA would give it NaN, and
    # the NaN would reach real positions through 0 * NaN in the next layer's attention.
    # Real queries already attend to themselves, so their outputs are unchanged.
    allowed = allowed | (k_pos == q_pos)
    return AttentionLayout(allowed)  # (B or 1, 1, Lq, keys): SDPA broadcasts the batch dim
