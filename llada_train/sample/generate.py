"""The LLaDA reverse process with a fixed commit schedule (SPEC §5).

Start from prompt + ``gen_length`` MASK tokens. For each semi-autoregressive block, run
``steps / num_blocks`` model calls; each call predicts every masked position and commits a
scheduled number of them (random or highest-confidence). Positions after the current
block are never committed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llada_train.errors import LladaError
from llada_train.sample.common import (
    NEG_INF,
    SampleOutput,
    apply_eos_rules,
    block_bounds,
    chosen_probability,
    init_canvas,
    model_logits,
    num_transfer_schedule,
    progress_bar,
    random_uniform,
    region_mask,
    sample_tokens,
    steps_per_block,
    top_k_mask,
)

REMASKING = ("low_confidence", "random")


def stop_ids(eos_token_id: int | None, eot_token_id: int | None) -> list[int]:
    """The EOS/EoT ids that are set, in order."""
    return [t for t in (eos_token_id, eot_token_id) if t is not None]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P), left-padded when prompts differ in length
    gen_length: int = 128,
    steps: int = 128,
    block_length: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    *,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,  # (B, P), 1 = real token
    cfg_scale: float = 0.0,
    eos_token_id: int | None = None,
    eot_token_id: int | None = None,
    forbid_eos: bool = False,
    eos_zero_confidence: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Sample ``gen_length`` tokens after each prompt with the LLaDA reverse process.

    ``block_length`` None means one block (pure diffusion); ``steps`` must be a multiple of the
    number of blocks. ``remasking``: "low_confidence" commits the most probable predictions,
    "random" a uniformly random subset. ``temperature`` 0 is argmax (deterministic);
    otherwise Gumbel-max in float64. ``cfg_scale`` w > 0 adds a prompt-masked pass and uses
    ``un + (w + 1)(cond - un)``. ``forbid_eos`` sets the EOS logit to -inf;
    ``eos_zero_confidence`` is the released sampler's ``confidence_eos_eot_inf``: EOS/EoT
    logits become -inf before the confidence softmax (positions choosing them score 0 and
    are committed last), ties broken in ``torch.topk`` order.
    """
    if remasking not in REMASKING:
        raise LladaError(f"remasking={remasking!r} is unknown; use one of {list(REMASKING)}")
    if eos_zero_confidence and not stop_ids(eos_token_id, eot_token_id):
        raise LladaError("eos_zero_confidence=True needs eos_token_id or eot_token_id")
    P = prompt_ids.shape[1]
    block_length = gen_length if block_length is None else block_length
    blocks = block_bounds(P, gen_length, block_length)
    per_block = steps_per_block(steps, len(blocks))
    x, attn = init_canvas(prompt_ids, gen_length, mask_token_id, attention_mask)
    B, L = x.shape
    row_nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    nfe = 0
    bar = progress_bar(steps, progress, "generate")
    for start, end in blocks:
        in_block = region_mask(L, start, end, x.device)  # (L,)
        schedule = num_transfer_schedule((x[:, start:end] == mask_token_id).sum(1), per_block)  # (B, S)
        for s in range(per_block):
            masked = (x == mask_token_id) & in_block  # (B, L) candidates of this step
            logits, calls = model_logits(model, x, attn, P, mask_token_id, cfg_scale)  # (B, L, V)
            nfe += calls
            row_nfe += calls * masked.any(1)
            x, _ = commit_step(
                x, logits, masked, schedule[:, s], temperature, remasking, generator,
                forbid_eos, eos_token_id, stop_ids(eos_token_id, eot_token_id) if eos_zero_confidence else [],
                mask_token_id=mask_token_id,
            )
            bar.update()
    bar.close()
    return SampleOutput(tokens=x, nfe=nfe, prompt_length=P, row_nfe=row_nfe)


def commit_step(
    x: torch.Tensor,  # (B, L)
    logits: torch.Tensor,  # (B, L, V)
    candidates: torch.Tensor,  # (B, L) bool: masked positions that may be committed now
    count: torch.Tensor,  # (B,) how many to commit per row
    temperature: float,
    remasking: str,
    generator: torch.Generator | None,
    forbid_eos: bool = False,
    eos_token_id: int | None = None,
    zero_conf_ids: Sequence[int] = (),
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step: predict, score, commit ``count`` candidates per row.

    ``mask_token_id`` is never chosen, yet stays in the confidence softmax (the released
    sampler's ``x0_p``). Returns the new canvas and the (B, L) bool mask of committed positions.
    """
    logits = apply_eos_rules(logits, forbid_eos, eos_token_id)
    x0 = sample_tokens(logits, temperature, generator, mask_token_id=mask_token_id)  # (B, L)
    if remasking == "low_confidence":
        # full softmax (MASK in the denominator); the released confidence_eos_eot_inf: stops
        # get logit -inf before the softmax
        conf = chosen_probability(logits, x0, exclude=zero_conf_ids)  # (B, L)
    else:
        conf = random_uniform(tuple(x0.shape), x0, generator)
    conf = torch.where(candidates, conf, torch.full_like(conf, NEG_INF))
    commit = top_k_mask(conf, count, ties="topk" if zero_conf_ids else "stable")
    return torch.where(commit, x0, x), commit
