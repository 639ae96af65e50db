"""Monte Carlo conditional likelihood bound of masked diffusion (SPEC §6, paper eq. 6).

    log p(r | p) >= E_{l ~ U{1..L}} [ (L / l) * sum_{i masked} log p(r_i | p, r with l masked) ]

where the l masked answer positions are chosen uniformly without replacement and the
prompt is never masked. The estimator draws ``n_samples`` masked copies of the answer in
batches; inside a batch the mask counts l are stratified (evenly spaced from a random
start), which lowers the variance against independent draws of l.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llada_train.errors import LladaError


def stratified_mask_counts(answer_length: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Mask counts l in {1..L} for one batch, (batch,): evenly spaced from a uniform start.

    Each entry is marginally U{1..L} (for batch <= L), so the estimator stays unbiased.
    """
    L = answer_length
    start = int(torch.randint(1, L + 1, (), generator=generator, device=generator.device))
    # integer offsets floor(j L / b): adding them to a uniform start keeps every entry uniform
    offsets = torch.arange(batch, dtype=torch.long) * L // batch
    return (start + offsets - 1) % L + 1


def random_answer_masks(counts: torch.Tensor, answer_length: int, generator: torch.Generator) -> torch.Tensor:
    """Bool (batch, L): row j masks ``counts[j]`` answer positions chosen without replacement."""
    keys = torch.rand((counts.shape[0], answer_length), generator=generator, device=generator.device)
    ranks = keys.argsort(dim=1).argsort(dim=1)  # a uniform random permutation per row
    return ranks.cpu() < counts.view(-1, 1)


@torch.no_grad()
def conditional_log_likelihood(
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
    """Monte Carlo estimate of the lower bound on ``log p(answer | prompt)``, in nats.

    ``n_samples`` masked copies (rounded up to whole batches) are averaged; a single-token
    answer needs one sample, since the bound is then exact. ``cfg_scale`` w > 0 uses
    guided logits ``un + (w + 1)(cond - un)`` with the prompt replaced by MASK for the
    unconditional pass. The random draws come only from ``generator``.
    """
    prompt = torch.as_tensor(list(prompt_ids) if not torch.is_tensor(prompt_ids) else prompt_ids).long().view(-1)
    answer = torch.as_tensor(list(answer_ids) if not torch.is_tensor(answer_ids) else answer_ids).long().view(-1)
    L, P = answer.numel(), prompt.numel()
    if L == 0:
        raise LladaError("conditional_log_likelihood: the answer is empty")
    if n_samples < 1 or batch_size < 1:
        raise LladaError(f"n_samples ({n_samples}) and batch_size ({batch_size}) must be >= 1")
    if L == 1:
        n_samples = batch_size = 1  # only l = 1 exists: the bound is computed exactly
    device = next(model.parameters()).device
    seq = torch.cat([prompt, answer]).to(device)  # (P + L,)
    total = 0.0
    drawn = 0
    while drawn < n_samples:
        b = min(batch_size, n_samples - drawn)
        counts = stratified_mask_counts(L, b, generator)  # (b,)
        masked = random_answer_masks(counts, L, generator).to(device)  # (b, L)
        noisy = seq.expand(b, -1).clone()  # (b, P + L)
        noisy[:, P:] = torch.where(masked, torch.full_like(masked, mask_token_id, dtype=torch.long), noisy[:, P:])
        logits = _guided_logits(model, noisy, P, mask_token_id, cfg_scale)[:, P:]  # (b, L, V)
        logp = -F.cross_entropy(logits.transpose(1, 2), answer.to(device).expand(b, -1), reduction="none")  # (b, L)
        weight = (L / counts.to(device, torch.float32)).view(-1, 1)  # (b, 1): the L / l factor
        total += float((logp * masked * weight).sum())
        drawn += b
    return total / drawn


def _guided_logits(
    model: torch.nn.Module, x: torch.Tensor, prompt_length: int, mask_token_id: int, cfg_scale: float
) -> torch.Tensor:
    """fp32 logits (B, L, V), guided when ``cfg_scale`` > 0 (prompt masked in the second pass)."""
    if cfg_scale > 0:
        un = x.clone()
        un[:, :prompt_length] = mask_token_id
        out = model(torch.cat([x, un], dim=0))
        cond, uncond = getattr(out, "logits", out).float().chunk(2, dim=0)
        return uncond + (cfg_scale + 1.0) * (cond - uncond)
    out = model(x)
    return getattr(out, "logits", out).float()
