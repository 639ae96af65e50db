"""MED, multi-token entropy decoding, and reasoning-as-infilling (SPEC §7, arXiv 2510.19990).

MED: each step commits the lowest-entropy masked position and, with it, every other
masked position whose predictive entropy is below ``entropy_threshold`` (lambda). Where
the model is sure, many tokens land in one call; where it is not, MED falls back to one
token per step.

Reasoning-as-infilling lays out ``prompt + [reasoning masks] + delimiter + [answer masks]``.
The sum of entropies over the still-masked answer positions measures how undecided the
answer is; once it drops below ``answer_entropy_threshold`` (gamma) the answer is filled
in one go and decoding stops (early exit). Given the answer instead, the same template
samples reasoning conditioned on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llada_train.errors import LladaError
from llada_train.sample.common import (
    SampleOutput,
    apply_eos_rules,
    block_bounds,
    entropy,
    init_canvas,
    model_logits,
    progress_bar,
    region_mask,
    sample_tokens,
)


def entropy_commit(
    x: torch.Tensor,  # (B, L)
    logits: torch.Tensor,  # (B, L, V)
    candidates: torch.Tensor,  # (B, L) bool
    entropy_threshold: float,
    temperature: float,
    generator: torch.Generator | None,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit the lowest-entropy candidate plus every candidate with entropy < lambda.

    The entropy is the full softmax's, MASK included (the reference ``neg_entropy`` scores);
    ``mask_token_id`` is only excluded from the committed token. Returns the new canvas and
    the (B, L) bool mask of committed positions. Rows without candidates are unchanged.
    """
    h = entropy(logits)  # (B, L)
    h = torch.where(candidates, h, torch.full_like(h, float("inf")))
    lowest = torch.zeros_like(candidates)
    lowest.scatter_(1, h.argmin(dim=1, keepdim=True), True)
    commit = ((h < entropy_threshold) | lowest) & candidates
    x0 = sample_tokens(logits, temperature, generator, mask_token_id=mask_token_id)  # (B, L)
    return torch.where(commit, x0, x), commit


@torch.no_grad()
def med_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P)
    gen_length: int = 128,
    block_length: int | None = None,
    *,
    mask_token_id: int,
    entropy_threshold: float = 0.2,
    temperature: float = 0.0,
    attention_mask: torch.Tensor | None = None,  # (B, P)
    cfg_scale: float = 0.0,
    eos_token_id: int | None = None,
    forbid_eos: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Semi-AR decoding with MED commits; the number of steps adapts to the model's certainty.

    At most ``gen_length`` steps (one token each) and usually far fewer.
    """
    if entropy_threshold < 0:
        raise LladaError(f"entropy_threshold={entropy_threshold} must be >= 0")
    P = prompt_ids.shape[1]
    block_length = gen_length if block_length is None else block_length
    x, attn = init_canvas(prompt_ids, gen_length, mask_token_id, attention_mask)
    B, L = x.shape
    row_nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    nfe = 0
    bar = progress_bar(gen_length, progress, "med")
    for start, end in block_bounds(P, gen_length, block_length):
        in_block = region_mask(L, start, end, x.device)
        while True:
            candidates = (x == mask_token_id) & in_block  # (B, L)
            if not bool(candidates.any()):
                break
            logits, calls = model_logits(model, x, attn, P, mask_token_id, cfg_scale)  # (B, L, V)
            nfe += calls
            row_nfe += calls * candidates.any(1)
            logits = apply_eos_rules(logits, forbid_eos, eos_token_id)
            x, commit = entropy_commit(
                x, logits, candidates, entropy_threshold, temperature, generator, mask_token_id=mask_token_id
            )
            bar.update(int(commit.sum()))
    bar.close()
    return SampleOutput(tokens=x, nfe=nfe, prompt_length=P, row_nfe=row_nfe)


@dataclass
class InfillOutput(SampleOutput):
    """An infilling result: spans of the template and which rows exited early."""

    reasoning_span: tuple[int, int] = (0, 0)  # absolute [start, end) of the reasoning
    answer_span: tuple[int, int] = (0, 0)  # absolute [start, end) of the answer
    early_exit: torch.Tensor | None = None  # (B,) bool: answer filled before reasoning finished

    @property
    def answer(self) -> torch.Tensor:
        """The answer tokens, (B, A)."""
        return self.tokens[:, self.answer_span[0] : self.answer_span[1]]

    @property
    def reasoning(self) -> torch.Tensor:
        """The reasoning tokens, (B, R); masks remain where an early exit left them."""
        return self.tokens[:, self.reasoning_span[0] : self.reasoning_span[1]]


@torch.no_grad()
def infill_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P)
    reasoning_length: int,
    delimiter_ids: Sequence[int],
    answer_length: int | None = None,
    *,
    mask_token_id: int,
    answer_ids: torch.Tensor | None = None,  # (B, A): condition on a given answer
    entropy_threshold: float = 0.2,
    answer_entropy_threshold: float = 0.1,
    early_exit: bool = True,
    temperature: float = 0.0,
    attention_mask: torch.Tensor | None = None,  # (B, P)
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> InfillOutput:
    """Reasoning-as-infilling: decode ``prompt + reasoning + delimiter + answer`` with MED.

    Without ``answer_ids``: reasoning and answer masks are decoded together; when the summed
    entropy of a row's still-masked answer positions falls below ``answer_entropy_threshold``
    (gamma), that row's answer is filled by argmax and the row stops (when ``early_exit``).
    With ``answer_ids``: the answer is fixed and only the reasoning is sampled.
    """
    if answer_ids is None and answer_length is None:
        raise LladaError("infill_generate: give answer_length (to generate) or answer_ids (to condition on)")
    B, P = prompt_ids.shape
    dev = prompt_ids.device
    delim = torch.as_tensor(list(delimiter_ids), dtype=torch.long, device=dev).expand(B, -1)  # (B, D)
    if answer_ids is not None:
        answer = answer_ids.long().to(dev)
        if answer.shape[0] != B:
            raise LladaError(f"answer_ids has {answer.shape[0]} rows for {B} prompts")
    else:
        answer = torch.full((B, answer_length), mask_token_id, dtype=torch.long, device=dev)
    A = answer.shape[1]
    tail = torch.cat([delim, answer], dim=1)  # (B, D + A) goes after the reasoning masks
    x, attn = init_canvas(prompt_ids, reasoning_length, mask_token_id, attention_mask)
    x = torch.cat([x, tail], dim=1)  # (B, P + R + D + A)
    if attn is not None:
        attn = torch.cat([attn, torch.ones_like(tail)], dim=1)
    L = x.shape[1]
    reasoning_span = (P, P + reasoning_length)
    answer_span = (L - A, L)
    generated = region_mask(L, *reasoning_span, dev) | region_mask(L, *answer_span, dev)  # (L,)
    in_answer = region_mask(L, *answer_span, dev)
    check_answer = early_exit and answer_ids is None
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    exited = torch.zeros(B, dtype=torch.bool, device=dev)
    row_nfe = torch.zeros(B, dtype=torch.long, device=dev)
    nfe = 0
    bar = progress_bar(reasoning_length + A, progress, "infill")
    while True:
        if check_answer and answer_entropy_threshold > 0:
            # a complete answer has uncertainty 0 < gamma: the row stops without another call
            answer_open = (x == mask_token_id) & in_answer  # (B, L)
            finished = ~answer_open.any(1) & ~done
            exited |= finished & ((x == mask_token_id) & generated).any(1)
            done |= finished
        candidates = (x == mask_token_id) & generated & ~done[:, None]  # (B, L)
        if not bool(candidates.any()):
            break
        logits, _ = model_logits(model, x, attn, P, mask_token_id)  # (B, L, V)
        nfe += 1
        row_nfe += candidates.any(1)
        before = int((x == mask_token_id).sum())
        if check_answer:
            open_answer = candidates & in_answer  # (B, L)
            h = entropy(logits)
            uncertainty = torch.where(open_answer, h, torch.zeros_like(h)).sum(1)  # (B,)
            # the answer is settled: fill every open answer position by argmax and stop the row
            settle = open_answer.any(1) & (uncertainty < answer_entropy_threshold)
            filled = sample_tokens(logits, 0.0, mask_token_id=mask_token_id)  # (B, L) argmax, never MASK
            x = torch.where(open_answer & settle[:, None], filled, x)
            exited |= settle & (candidates & ~in_answer).any(1)
            done |= settle
            candidates &= ~done[:, None]
        x, _ = entropy_commit(
            x, logits, candidates, entropy_threshold, temperature, generator, mask_token_id=mask_token_id
        )
        bar.update(before - int((x == mask_token_id).sum()))
    bar.close()
    return InfillOutput(
        tokens=x, nfe=nfe, prompt_length=P, row_nfe=row_nfe,
        reasoning_span=reasoning_span, answer_span=answer_span, early_exit=exited,
    )
