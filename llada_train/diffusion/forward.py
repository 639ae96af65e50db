"""The forward (noising) process of masked diffusion: per-token Bernoulli(p) masking (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llada_train.keyed_random import derive_key, uniform01


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


# ---- counter-based draws: a pure function of (seed, step, global sample index) ----------
# Tags keep the streams of one sample apart (t, the per-token draws, the CFG prompt drop).
_T, _TOKENS, _DROP, _CUT = 0x54, 0x4D, 0x44, 0x43
_STRATA, _EMBED = 0x53, 0x45  # block diffusion: the order of a row's t strata; embedding noise


@dataclass(frozen=True)
class NoiseKey:
    """The mask randomness of one optimizer step: every draw is a hash of (seed, step, what).

    A sample's t and Bernoulli draws depend on its global index only, so 1 rank or 8, micro
    batch 2 or 4, draw the same masks for the same global batch; the 1% cut depends on
    (seed, step) only and so applies to the whole global batch.
    """

    seed: int
    step: int
    # the step's block size from the schedule's block-size curriculum (0 = the whole
    # sequence); None without a curriculum. Only block diffusion reads it.
    block_size: int | None = None

    def row_uniforms(self, index: torch.Tensor, tag: int, width: int) -> torch.Tensor:
        """(B, width) float32 uniforms in [0, 1) for the samples ``index`` (B,)."""
        rows = index.detach().cpu().numpy().astype(np.int64)
        out = np.empty((len(rows), width), dtype=np.float64)
        counters = np.arange(width, dtype=np.int64)
        for b, i in enumerate(rows.tolist()):
            out[b] = uniform01(counters, derive_key(self.seed, self.step, i, tag))
        return torch.from_numpy(out).float()

    def mask_prob(self, index: torch.Tensor, eps: float) -> torch.Tensor:
        """p = (1 - eps) t + eps per sample, (B,)."""
        return (1 - eps) * self.row_uniforms(index, _T, 1)[:, 0] + eps

    def t_uniforms(self, index: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) draws of t (one per block); column 0 is ``mask_prob``'s t, so one block
        draws what the full-sequence objectives draw."""
        return self.row_uniforms(index, _T, width)

    def strata_uniforms(self, index: torch.Tensor, width: int) -> torch.Tensor:
        """(B, width) draws whose ranks order a row's t strata (antithetic per-block t)."""
        return self.row_uniforms(index, _STRATA, width)

    def embed_noise(self, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """(B, *shape) standard normal draws per sample (mask-embedding noise), float32."""
        rows = []
        for i in index.detach().cpu().tolist():
            g = torch.Generator().manual_seed(derive_key(self.seed, self.step, i, _EMBED) >> 1)
            rows.append(torch.randn(shape, generator=g))
        return torch.stack(rows)

    def token_uniforms(self, index: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length) per-token draws; a shorter length takes a prefix of the same draws."""
        return self.row_uniforms(index, _TOKENS, length)

    def drop_uniforms(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) draws for dropping a row's prompt (CFG training)."""
        return self.row_uniforms(index, _DROP, 1)[:, 0]

    def cut_length(self, length: int, cut_prob: float) -> int:
        """The step's length: ``length``, or with probability ``cut_prob`` one of U{1..length}."""
        coin, pick = uniform01(np.arange(2, dtype=np.int64), derive_key(self.seed, self.step, _CUT))
        return 1 + min(int(pick * length), length - 1) if coin < cut_prob else length


def mask_from_uniforms(
    input_ids: torch.Tensor,  # (B, L)
    p_mask: torch.Tensor,  # (B,)
    u: torch.Tensor,  # (B, L) uniforms
    mask_token_id: int,
    maskable: torch.Tensor | None = None,  # (B, L) bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_tokens`` with the uniforms given: masked where ``u < p`` (and maskable)."""
    dev = input_ids.device
    masked = u.to(dev) < p_mask.to(dev)[:, None]
    if maskable is not None:
        masked &= maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked
