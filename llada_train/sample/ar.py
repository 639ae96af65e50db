"""The autoregressive twin's decoding and exact log-likelihood (issue 15).

``ar_generate`` decodes left to right, one token per forward pass, greedy (temperature 0)
or by temperature sampling. With ``use_cache=True`` (the default) it keeps every layer's
keys/values in a growing ``PrefixCache``: exact for a causal model, whose earlier positions
never see later ones, so each step runs only the newest token. ``use_cache=False`` reruns
the whole sequence every step (the reference the cached path is tested against).

``ar_log_likelihood`` is the exact ``log p(continuation | prompt)`` of one forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from llada_train.errors import LladaError
from llada_train.model.kv_cache import PrefixCache
from llada_train.sample.common import SampleOutput


def _causal_config(model: Any, what: str) -> Any:
    cfg = getattr(model, "module", model).config
    if not cfg.causal:
        raise LladaError(f"{what} needs a causal model (model.causal=true); this one is bidirectional")
    if cfg.shift_logits:
        raise LladaError(
            f"{what} reads the last position's next-token logits, which a shift_logits model "
            "drops; use an unshifted causal model"
        )
    return cfg


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): argmax, or a softmax draw at T."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # float64 like SPEC §5
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def ar_generate(
    model: Any,
    prompt: torch.Tensor,  # (B, P) int64, left-padded when rows differ
    gen_length: int,
    *,
    attention_mask: torch.Tensor | None = None,  # (B, P), 1 = real token
    temperature: float = 0.0,
    eos_token_id: int | None = None,  # rows stop after it, then repeat it
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> SampleOutput:
    """Left-to-right decoding of ``gen_length`` tokens; ``nfe`` counts forward passes.

    Left padding is exact: padding keys are masked, and RoPE depends only on relative
    positions, so a padded row's tokens score as they would unpadded.
    """
    _causal_config(model, "ar_generate")
    if gen_length < 1:
        raise LladaError(f"ar_generate: gen_length={gen_length} must be >= 1")
    B, P = prompt.shape
    ids = prompt
    mask = attention_mask.long() if attention_mask is not None else None
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    cache = PrefixCache(P, grow=True) if use_cache else None
    step_input = ids
    nfe = 0
    for _ in range(gen_length):
        logits = model(step_input, mask, cache=cache) if cache is not None else model(ids, mask)
        nfe += 1
        nxt = _pick(logits[:, -1].float(), temperature, generator)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        step_input = nxt[:, None]  # the cache holds every earlier position
        if eos_token_id is not None and bool(done.all()):
            break
    if ids.shape[1] < P + gen_length:  # every row stopped early: pad with EOS to full width
        pad = ids.new_full((B, P + gen_length - ids.shape[1]), eos_token_id)
        ids = torch.cat([ids, pad], dim=1)
    return SampleOutput(ids, nfe, P)


@torch.no_grad()
def ar_log_likelihood(
    model: Any,
    prompt: torch.Tensor,  # (B, P) int64, left-padded when rows differ
    continuation: torch.Tensor,  # (B, C) int64
    attention_mask: torch.Tensor | None = None,  # (B, P) for the prompt, 1 = real token
) -> torch.Tensor:
    """Exact ``sum_j log p(c_j | prompt, c_<j)`` per row, (B,) float64, in one forward pass."""
    _causal_config(model, "ar_log_likelihood")
    if prompt.ndim != 2 or continuation.ndim != 2 or prompt.shape[0] != continuation.shape[0]:
        raise LladaError(
            f"ar_log_likelihood: prompt {tuple(prompt.shape)} and continuation "
            f"{tuple(continuation.shape)} must be (B, P) and (B, C) with the same B"
        )
    B, P = prompt.shape
    C = continuation.shape[1]
    if P < 1:
        raise LladaError("ar_log_likelihood: the prompt needs at least one token (e.g. BOS)")
    ids = torch.cat([prompt, continuation], dim=1)  # (B, P + C)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, C).long()], dim=1)
    logits = model(ids, mask)[:, P - 1 : P + C - 1]  # (B, C, V): row j predicts c_j
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(2, continuation[:, :, None]).squeeze(2).sum(dim=1)  # (B,)
