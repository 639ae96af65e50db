"""Attention layouts: padding, causal and document (block-diagonal) masks, combined once per pass.

The model builds one layout per forward pass and every block reuses it. The plain cases keep
their fast kernels: bidirectional attention with at most a padding mask (the LLaDA default)
passes the (B, 1, 1, keys) key mask as before, and causal attention without padding,
documents or a cached prefix uses SDPA's / flash-attn's ``is_causal`` with no mask at all.

Block diffusion (BD3-LM, LLaDA 2.0) has one rule, ``block_diffusion_rule``, used for both of
its layouts: the training input ``cat(x_t, x_0)`` of length 2L ("paired"), and the block-causal
inference layout of one sequence, where every position counts as clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llada_train.errors import LladaError


@dataclass
class AttentionLayout:
    """What every block's attention receives: a boolean mask (True = attend), a flex
    ``BlockMask`` (block diffusion with ``attention_backend=flex``) or a causal flag."""

    mask: Any  # (B or 1, 1, 1 or Lq, keys) bool tensor, a flex BlockMask, or None
    is_causal: bool = False  # SDPA/flash ``is_causal``; only with mask None and Lq == keys


def block_diffusion_rule(
    q_block: torch.Tensor,  # block index of each query (any shape broadcasting with the keys')
    q_clean: torch.Tensor,  # bool: the query belongs to the clean copy x_0
    k_block: torch.Tensor,
    k_clean: torch.Tensor,
) -> torch.Tensor:
    """True where the query may attend to the key (BD3-LM's ``block_diff_mask``).

    A noisy query in block b sees its own noisy block and the clean blocks < b; a clean query
    in block b sees the clean blocks <= b; clean never sees noisy. Written with element-wise
    ops only, so the same function serves dense masks and flex_attention's ``mask_mod``.
    """
    own_noisy_block = ~q_clean & ~k_clean & (q_block == k_block)
    earlier_clean = ~q_clean & k_clean & (k_block < q_block)
    clean_causal = q_clean & k_clean & (k_block <= q_block)
    return own_noisy_block | earlier_clean | clean_causal


def block_positions(
    indices: torch.Tensor, block_size: int, paired_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, is clean) of attention indices.

    ``paired_length`` > 0: the input is ``cat(x_t, x_0)`` with that L, so indices >= L are the
    clean copy and blocks restart there. 0: one sequence, all clean (block-causal inference).
    """
    if paired_length:
        clean = indices >= paired_length
        return torch.where(clean, indices - paired_length, indices) // block_size, clean
    return indices // block_size, torch.ones_like(indices, dtype=torch.bool)


def check_block_size(block_size: int, length: int, what: str) -> None:
    """One line when ``block_size`` does not tile a training sequence of ``length``."""
    if block_size < 1 or length % block_size:
        raise LladaError(
            f"{what}: block size {block_size} does not divide the sequence length {length}; "
            "pick a block size that divides trainer.seq_len (e.g. a power of two)"
        )


def flex_block_mask(
    batch: int,
    length: int,  # positions of the pass (2L when paired)
    block_size: int,
    paired: bool,
    document_ids: torch.Tensor | None,  # (B, length) int
    key_mask: torch.Tensor | None,  # (B, length) bool, True = real key
    device: torch.device,
) -> Any:
    """``block_diffusion_rule`` (AND documents, AND padding, OR self) as a flex_attention
    ``BlockMask``: the dense layout's exact rule, evaluated per (query, key) index by flex,
    which then skips the fully masked tiles (about half of the 2L x 2L grid)."""
    from torch.nn.attention.flex_attention import create_block_mask

    half = length // 2 if paired else 0

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q_block, q_clean = block_positions(q, block_size, half)
        k_block, k_clean = block_positions(k, block_size, half)
        ok = block_diffusion_rule(q_block, q_clean, k_block, k_clean)
        if document_ids is not None:
            ok = ok & (document_ids[b, q] == document_ids[b, k])
        if key_mask is not None:
            ok = ok & key_mask[b, k]
        return ok | (q == k)  # as the dense layout: a query always sees itself

    per_row = document_ids is not None or key_mask is not None
    return create_block_mask(
        mask_mod, B=batch if per_row else None, H=None, Q_LEN=length, KV_LEN=length, device=device
    )


def attention_layout(
    batch: int,
    length: int,  # Lq: positions run in this pass
    offset: int,  # cached positions before them (keys = offset + length)
    attention_mask: torch.Tensor | None,  # (B, keys), 1 = real token
    document_ids: torch.Tensor | None,  # (B, length) int, equal ids attend to each other
    causal: bool,
    device: torch.device,
    block_size: int = 0,  # > 0: block diffusion attention with blocks of this size
    paired: bool = False,  # with block_size: the input is cat(x_t, x_0), length 2L
    flex: bool = False,  # block diffusion without a cache: a flex BlockMask, not a dense one
) -> AttentionLayout:
    """The attention layout of one pass (shapes checked, one line on a mismatch)."""
    keys = offset + length
    if paired and (offset or length % 2 or not block_size):
        raise LladaError(
            "model: a paired block-diffusion pass takes cat(x_t, x_0) of even length, a block "
            "size and no filled cache"
        )
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
    if not causal and document_ids is None and not block_size:
        return AttentionLayout(key_mask)  # LLaDA's bidirectional attention, unchanged
    if causal and document_ids is None and key_mask is None and offset == 0 and not block_size:
        return AttentionLayout(None, is_causal=True)
    if flex and block_size and not causal and offset == 0:
        keys_real = None if attention_mask is None else attention_mask.bool()
        return AttentionLayout(
            flex_block_mask(batch, length, block_size, paired, document_ids, keys_real, device)
        )
    q_pos = torch.arange(offset, keys, device=device)[:, None]  # (Lq, 1) absolute positions
    k_pos = torch.arange(keys, device=device)[None, :]  # (1, keys)
    allowed = torch.ones(1, 1, length, keys, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (k_pos <= q_pos)  # (1, 1, Lq, keys)
    if block_size:
        half = length // 2 if paired else 0
        q_block, q_clean = block_positions(q_pos, block_size, half)
        k_block, k_clean = block_positions(k_pos, block_size, half)
        allowed = allowed & block_diffusion_rule(q_block, q_clean, k_block, k_clean)
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
