"""The forward (noising) process of masked diffusion: per-token Bernoulli(p) masking (SPEC §2)."""

from __future__ import annotations

import torch


def sample_mask_prob(batch_size: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """p = (1 - eps) * t + eps with t ~ U(0, 1) per sequence; shape (B,)."""
    t = torch.rand(batch_size, generator=generator, device=generator.device)
    return (1 - eps) * t + eps


def mask_tokens(
    input_ids: torch.Tensor,  # (B, L)
    p_mask: torch.Tensor,  # (B,) masking probability per row
    mask_token_id: int,
    generator: torch.Generator,
    maskable: torch.Tensor | None = None,  # (B, L) bool; False positions are never masked
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each token by ``mask_token_id`` independently with probability ``p_mask[row]``.

    Returns ``(noisy_ids, masked)`` where ``masked`` is the (B, L) bool mask of replaced positions.
    """
    u = torch.rand(input_ids.shape, generator=generator, device=generator.device).to(input_ids.device)
    masked = u < p_mask.to(input_ids.device)[:, None]
    if maskable is not None:
        masked &= maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked


def maybe_cut_length(
    input_ids: torch.Tensor, cut_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """With probability ``cut_prob`` cut the whole batch to a length drawn from U{1..L}.

    This is the paper's "1% variable-length sequences"; both draws are always made so the
    random stream does not depend on the outcome.
    """
    L = input_ids.shape[1]
    coin = torch.rand((), generator=generator, device=generator.device).item()
    new_len = int(torch.randint(1, L + 1, (), generator=generator, device=generator.device).item())
    return input_ids[:, :new_len] if coin < cut_prob else input_ids
