"""Fast-dLLM style decoding: confidence-threshold parallel commits and a prefix KV cache.

Threshold decoding commits, at each step, every masked position of the current block
whose chosen token has probability >= ``threshold`` (at least one per step), so easy
stretches of text cost one model call for many tokens.

The prefix KV cache is approximate by design. Attention is bidirectional, so the keys
and values of the prompt and of finished blocks depend on the tokens of the current
block, which change at every step. The cache computes them once, with a full forward
pass at the start of each block, and reuses them for that block's later steps, which
then run the transformer on the current block and everything after it only. Within a
block the prefix sees the block as it was at the block's first step; outputs can
therefore differ from uncached decoding, while each cached step costs roughly
``(L - block_start) / L`` of a full pass. Finished blocks (not the prompt alone) are
what make the saving grow along the answer. The model owns the cache
(``llada_train.model.PrefixCache``): this module only calls the model.
"""

from __future__ import annotations

import torch

from llada_train.errors import LladaError
from llada_train.model.kv_cache import PrefixCache
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
    sample_tokens,
    steps_per_block,
    top_k_mask,
)


def threshold_commit(
    xb: torch.Tensor,  # (B, Lb) current block
    logits: torch.Tensor,  # (B, Lb, V)
    threshold: float | None,
    count: torch.Tensor | None,  # (B,) fixed-schedule count when threshold is None
    temperature: float,
    generator: torch.Generator | None,
    mask_token_id: int,
) -> torch.Tensor:
    """Commit confident predictions in a block; returns the new block (B, Lb).

    With a threshold: every masked position with probability >= threshold, plus the most
    confident one so each step makes progress. Without: the ``count`` most confident.
    """
    masked = xb == mask_token_id  # (B, Lb)
    x0 = sample_tokens(logits, temperature, generator, mask_token_id=mask_token_id)  # (B, Lb)
    # Fast-dLLM's confidence is the full softmax's probability, MASK in the denominator
    conf = torch.where(masked, chosen_probability(logits, x0), torch.full_like(logits[..., 0], NEG_INF))
    if threshold is None:
        commit = top_k_mask(conf, count)
    else:
        top1 = top_k_mask(conf, torch.ones(xb.shape[0], dtype=torch.long, device=xb.device))
        commit = (conf >= threshold) | top1
    return torch.where(commit & masked, x0, xb)


@torch.no_grad()
def fast_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P)
    gen_length: int = 128,
    block_length: int = 32,
    *,
    mask_token_id: int,
    threshold: float | None = 0.9,
    steps: int | None = None,
    use_cache: bool = False,
    temperature: float = 0.0,
    attention_mask: torch.Tensor | None = None,  # (B, P)
    cfg_scale: float = 0.0,
    eos_token_id: int | None = None,
    forbid_eos: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Semi-AR low-confidence decoding with threshold commits and/or a prefix KV cache.

    ``threshold`` (Fast-dLLM's tau, 0.9) commits every masked in-block position at least that
    confident, one at minimum; steps then adapt to the text. ``threshold=None`` uses the
    fixed schedule of ``steps`` (as ``generate``). ``use_cache`` reuses the prompt and
    finished blocks' keys/values within a block: faster, approximate (see module doc); the
    model's forward must take ``cache=`` (``LLaDAModel`` does). A cached step counts as one
    forward pass in ``nfe`` although it is cheaper.
    """
    if threshold is None and steps is None:
        raise LladaError("fast_generate: give a threshold or a fixed number of steps")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise LladaError(f"threshold={threshold} must be in (0, 1]")
    if use_cache and cfg_scale > 0:
        raise LladaError("use_cache=True does not support classifier-free guidance; set cfg_scale=0")
    P = prompt_ids.shape[1]
    blocks = block_bounds(P, gen_length, block_length)
    per_block = steps_per_block(steps, len(blocks)) if threshold is None else None
    x, attn = init_canvas(prompt_ids, gen_length, mask_token_id, attention_mask)
    B = x.shape[0]
    row_nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    nfe = 0
    bar = progress_bar(gen_length, progress, "fast_generate")
    for start, end in blocks:
        count = None
        if per_block is not None:
            schedule = num_transfer_schedule((x[:, start:end] == mask_token_id).sum(1), per_block)
        cache = PrefixCache(keep=start) if use_cache else None  # the prompt and finished blocks
        step = 0
        while bool((x[:, start:end] == mask_token_id).any()) and (per_block is None or step < per_block):
            before = int((x[:, start:end] == mask_token_id).sum())
            active = (x[:, start:end] == mask_token_id).any(1)  # (B,) rows with work left
            calls = 1
            if cache is not None:
                if cache.filled:  # later steps: run x[:, start:] against the recorded prefix
                    logits = model(x[:, start:], attention_mask=attn, cache=cache).float()
                else:  # the block's first step: a full pass that records positions [0, start)
                    logits = model(x, attention_mask=attn, cache=cache).float()[:, start:]
            else:
                logits, calls = model_logits(model, x, attn, P, mask_token_id, cfg_scale)
                logits = logits[:, start:]
            nfe += calls
            row_nfe += calls * active
            logits = logits[:, : end - start]  # (B, Lb, V); MASK is excluded by threshold_commit
            logits = apply_eos_rules(logits, forbid_eos, eos_token_id)
            if per_block is not None:
                count = schedule[:, step]
            x[:, start:end] = threshold_commit(
                x[:, start:end], logits, threshold, count, temperature, generator, mask_token_id
            )
            bar.update(before - int((x[:, start:end] == mask_token_id).sum()))
            step += 1
    bar.close()
    return SampleOutput(tokens=x, nfe=nfe, prompt_length=P, row_nfe=row_nfe)
