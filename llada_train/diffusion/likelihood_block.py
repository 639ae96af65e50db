"""The block NELBO: the likelihood bound of a block-diffusion model (BD3-LM, issue 21).

A block model factorises over blocks of b positions from position 0,
log p(x) = sum_j log p(x_j | x_<j), and bounds each factor by masked diffusion inside
the block. For an answer r after a prompt p (the prompt is never masked):

    log p(r | p) >= sum_j E_{l_j ~ U{1..L_j}} [ (L_j / l_j) sum_{i in block j, masked} log p(r_i | ...) ]

where L_j counts the answer tokens of block j, l_j of them are masked uniformly without
replacement, and block j is predicted from its own noisy tokens and the clean blocks
before it. Per block this is SPEC §6's estimator; its expectation equals the per-block t
form E_t[(1/t) sum_masked log p] with Bernoulli(t) masking, since
C(L, l) * Beta(l, L - l + 1) = 1/l. Each block draws its own stratified counts, so the sum
over blocks is unbiased.

One forward pass scores all blocks: BD3-LM's paired input cat(x_t, x_0) with
``paired=True``, where block j's noisy queries see only their own noisy block and the clean
blocks < j. With a single block holding answer tokens the prompt blocks before it are
already clean, so one block-causal pass over x_t does (no clean half); when one block holds
the whole sequence that pass is the full-diffusion one, and the estimate equals
``conditional_log_likelihood``'s draw for draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llada_train.diffusion.likelihood import (
    conditional_log_likelihood,
    random_answer_masks,
    stratified_mask_counts,
)
from llada_train.errors import LladaError


def answer_spans(prompt_length: int, total: int, block_size: int) -> list[tuple[int, int]]:
    """Absolute ``[start, end)`` of the answer positions in each block that holds some."""
    first = prompt_length // block_size
    last = (total - 1) // block_size
    return [
        (max(prompt_length, j * block_size), min(total, (j + 1) * block_size))
        for j in range(first, last + 1)
    ]


def _ids(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values.tolist() if torch.is_tensor(values) else list(values)).long().view(-1)


@torch.no_grad()
def block_conditional_log_likelihood(
    model: torch.nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    block_size: int,
    mask_token_id: int,
    generator: torch.Generator,
    n_samples: int = 128,
    batch_size: int = 32,
) -> float:
    """Monte Carlo estimate of the block bound on ``log p(answer | prompt)``, in nats.

    ``n_samples`` masked copies (rounded up to whole batches) are averaged; when no block
    holds more than one answer token every block's term is exact and one sample is drawn.
    The model must take ``block_size=`` and ``paired=`` (``LLaDAModel`` does).
    """
    prompt, answer = _ids(prompt_ids), _ids(answer_ids)
    P, L = prompt.numel(), answer.numel()
    if L == 0:
        raise LladaError("block likelihood: the answer is empty")
    if block_size < 1:
        raise LladaError(f"block likelihood: block_size={block_size} must be >= 1")
    if n_samples < 1 or batch_size < 1:
        raise LladaError(f"n_samples ({n_samples}) and batch_size ({batch_size}) must be >= 1")
    T = P + L
    spans = answer_spans(P, T, block_size)
    if max(e - s for s, e in spans) == 1:
        n_samples = batch_size = 1  # only l = 1 exists in every block: the bound is exact
    device = next(model.parameters()).device
    seq = torch.cat([prompt, answer]).to(device)  # (T,)
    target = answer.to(device)
    paired = len(spans) > 1
    plain_block = 0 if block_size >= T else block_size  # one block = full attention (1L path)
    total, drawn = 0.0, 0
    while drawn < n_samples:
        b = min(batch_size, n_samples - drawn)
        noisy = seq.expand(b, -1).clone()  # (b, T)
        weight = torch.zeros(b, T, device=device)  # L_j / l_j on masked answer positions
        for s, e in spans:
            counts = stratified_mask_counts(e - s, b, generator)  # (b,)
            masked = random_answer_masks(counts, e - s, generator).to(device)  # (b, L_j)
            noisy[:, s:e] = torch.where(masked, torch.full_like(noisy[:, s:e], mask_token_id), noisy[:, s:e])
            weight[:, s:e] = masked * ((e - s) / counts.to(device, torch.float32)).view(-1, 1)
        if paired:  # cat(x_t, x_0): every block against clean earlier blocks, in one pass
            out = model(torch.cat([noisy, seq.expand(b, -1)], dim=1), paired=True, block_size=block_size)
        else:
            out = model(noisy, block_size=plain_block)
        logits = getattr(out, "logits", out).float()[:, P:]  # (b, L, V)
        logp = -F.cross_entropy(logits.transpose(1, 2), target.expand(b, -1), reduction="none")  # (b, L)
        total += float((logp * weight[:, P:]).sum())
        drawn += b
    return total / drawn


def model_block_size(model: torch.nn.Module) -> int:
    """The block size a model was trained with (``config.block_size``; 0 = none)."""
    return int(getattr(getattr(model, "config", None), "block_size", 0) or 0)


def log_likelihood_bound(
    model: torch.nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    *,
    mask_token_id: int,
    generator: torch.Generator,
    n_samples: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
) -> float:
    """The model's own bound: the block NELBO for a block model (``config.block_size`` > 0),
    SPEC §6's full-diffusion bound otherwise."""
    b = model_block_size(model)
    if not b:
        return conditional_log_likelihood(
            model, prompt_ids, answer_ids, mask_token_id=mask_token_id, generator=generator,
            n_samples=n_samples, batch_size=batch_size, cfg_scale=cfg_scale,
        )
    if cfg_scale > 0:
        raise LladaError("the block likelihood has no classifier-free guidance: use cfg_scale=0 "
                         f"for a block model (config.block_size={b})")
    return block_conditional_log_likelihood(
        model, prompt_ids, answer_ids, block_size=b, mask_token_id=mask_token_id,
        generator=generator, n_samples=n_samples, batch_size=batch_size,
    )
