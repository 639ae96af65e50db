"""TOLERATOR: fill up first, then refine by token-level cross-validation ("Finish First, Perfect Later").

Stage 1 (``round(rho * budget)`` steps) is ordinary low-confidence decoding with an
end-of-text penalty: the probability of EoT is divided by ``eot_penalty`` (> 1), which
discourages drafts that stop too early. Stage 2 spends the rest of the budget on
refinement rounds: each round remasks a random fraction gamma_k of the generated tokens
(cosine from ``gamma_start`` to ``gamma_end``), re-predicts them from the others in one
forward pass and keeps the re-predictions, so earlier mistakes can be revised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llada_train.errors import LladaError
from llada_train.sample.common import (
    SampleOutput,
    model_logits,
    progress_bar,
    random_uniform,
    sample_tokens,
    top_k_mask,
)
from llada_train.sample.generate import generate


class _PenalizedModel:
    """Calls a model and divides the probability of the given tokens by ``penalty``.

    Dividing a probability by lambda and renormalising is subtracting log(lambda) from
    its logit, which also commutes with classifier-free guidance.
    """

    def __init__(self, model: torch.nn.Module, token_ids: Sequence[int], penalty: float) -> None:
        self.model = model
        self.token_ids = list(token_ids)
        self.shift = math.log(penalty)

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(x, attention_mask=attention_mask)
        logits = getattr(out, "logits", out).float().clone()  # (B, L, V)
        logits[..., self.token_ids] -= self.shift
        return logits


def refinement_fractions(rounds: int, gamma_start: float = 0.8, gamma_end: float = 0.4) -> list[float]:
    """Cosine schedule of remask fractions over ``rounds``: ``gamma_start`` down to ``gamma_end``."""
    if rounds <= 1:
        return [gamma_start] * rounds
    return [
        gamma_end + (gamma_start - gamma_end) * 0.5 * (1 + math.cos(math.pi * k / (rounds - 1)))
        for k in range(rounds)
    ]


def split_budget(budget: int, gen_length: int, num_blocks: int, rho: float) -> tuple[int, int]:
    """(fill-up steps, refinement rounds) summing to ``budget``.

    Fill-up steps are a multiple of the number of blocks (the schedule splits them evenly)
    and at most ``gen_length`` (more would leave steps that commit nothing).
    """
    if budget < num_blocks:
        raise LladaError(f"TOLERATOR budget={budget} is below the number of blocks ({num_blocks})")
    if not 0.0 < rho <= 1.0:
        raise LladaError(f"TOLERATOR rho={rho} must be in (0, 1]")
    fill = min(round(rho * budget), gen_length)
    fill = max(num_blocks, fill - fill % num_blocks)
    return fill, budget - fill


@torch.no_grad()
def tolerator_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P)
    gen_length: int,
    budget: int,
    *,
    mask_token_id: int,
    eot_token_ids: Sequence[int] = (),
    eot_penalty: float = 1.2,
    rho: float = 0.5,
    gamma_start: float = 0.8,
    gamma_end: float = 0.4,
    block_length: int | None = None,
    temperature: float = 0.0,
    refine_temperature: float | None = None,
    attention_mask: torch.Tensor | None = None,  # (B, P)
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Fill-up with an EoT penalty, then refinement; spends exactly ``budget`` forward passes.

    ``eot_token_ids`` are the end-of-text tokens to penalise (EOS, and EoT for chat models).
    ``rho`` is the fraction of the budget for the fill-up stage (0.5 in the paper).
    ``refine_temperature`` samples the re-predictions (None: same as ``temperature``); a
    little noise lets repeated rounds explore instead of repeating one argmax.
    ``gamma_start``/``gamma_end`` bound the cosine schedule of remask fractions; the paper's
    0.8 -> 0.4 repairs poor drafts but can tear down a good one (see benchmarks/sample_bench.py).
    """
    if eot_penalty < 1.0:
        raise LladaError(f"eot_penalty={eot_penalty} must be >= 1 (1 = no penalty)")
    if not (0.0 < gamma_start <= 1.0 and 0.0 < gamma_end <= 1.0):
        raise LladaError(f"TOLERATOR remask fractions gamma_start={gamma_start}, gamma_end={gamma_end} must be in (0, 1]")
    block_length = gen_length if block_length is None else block_length
    if block_length < 1 or gen_length % block_length:
        raise LladaError(f"block_length={block_length} must divide gen_length={gen_length}")
    fill_steps, rounds = split_budget(budget, gen_length, gen_length // block_length, rho)
    drafter = _PenalizedModel(model, eot_token_ids, eot_penalty) if eot_token_ids else model
    draft = generate(
        drafter, prompt_ids, gen_length=gen_length, steps=fill_steps, block_length=block_length,
        temperature=temperature, mask_token_id=mask_token_id, attention_mask=attention_mask,
        generator=generator, progress=progress,
    )
    x = draft.tokens  # (B, P + G)
    P = draft.prompt_length
    B, L = x.shape
    attn = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        attn = torch.cat([attention_mask.long().to(x.device), torch.ones((B, gen_length), dtype=torch.long, device=x.device)], 1)
    generated = torch.zeros((B, L), dtype=torch.bool, device=x.device)
    generated[:, P:] = True
    refine_t = temperature if refine_temperature is None else refine_temperature
    bar = progress_bar(rounds, progress, "refine")
    for gamma in refinement_fractions(rounds, gamma_start, gamma_end):
        n = max(1, round(gamma * gen_length))
        # a uniformly random subset of n generated positions per row
        keys = torch.where(generated, random_uniform((B, L), x, generator), torch.full((B, L), float("-inf"), device=x.device))
        chosen = top_k_mask(keys, torch.full((B,), n, dtype=torch.long, device=x.device))
        noisy = torch.where(chosen, torch.full_like(x, mask_token_id), x)
        logits, _ = model_logits(model, noisy, attn, P, mask_token_id)  # (B, L, V)
        x = torch.where(chosen, sample_tokens(logits, refine_t, generator, mask_token_id=mask_token_id), x)
        bar.update()
    bar.close()
    nfe = draft.nfe + rounds
    return SampleOutput(tokens=x, nfe=nfe, prompt_length=P, row_nfe=torch.full((B,), nfe, dtype=torch.long))
