"""Pieces shared by every reverse-process sampler (SPEC §5).

Every sampler is a plain function over a model: ``logits = model(ids, attention_mask)``.
Token ids arrive as parameters, never as literals, so a tiny model with its own
tokenizer samples exactly like the released one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llada_train.errors import LladaError

NEG_INF = float("-inf")


@dataclass
class SampleOutput:
    """Result of a sampler.

    ``tokens`` holds prompt and generation, (B, P + G). ``nfe`` counts model forward passes
    spent on the batch (a classifier-free-guidance step counts 2). ``row_nfe`` (B,) counts the
    passes in which each row still had masked positions to fill: what the row would have
    cost on its own, which differs from ``nfe`` for adaptive samplers (MED, threshold).
    """

    tokens: torch.Tensor  # (B, P + G)
    nfe: int
    prompt_length: int
    row_nfe: torch.Tensor | None = None  # (B,) int64

    @property
    def generated(self) -> torch.Tensor:
        """The generated part only, (B, G)."""
        return self.tokens[:, self.prompt_length :]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths with left padding.

    Returns ``(ids, attention_mask)``, both (B, P_max); the mask is 1 on real tokens.
    Left padding keeps every prompt adjacent to its generation.
    """
    if not prompts:
        raise LladaError("no prompts given: pass at least one prompt")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            attn[i, width - len(p) :] = 1
    return ids, attn


def num_transfer_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens to commit at each step of a block, (B, steps).

    With M masked positions and S steps: floor(M/S) per step, one more in the first M mod S
    steps, so the counts sum to M and the block is complete after S steps.
    """
    if steps < 1:
        raise LladaError(f"steps per block must be >= 1, got {steps}")
    m = masked_count.to(torch.long).view(-1, 1)  # (B, 1)
    base = m // steps
    extra = (torch.arange(steps, device=m.device)[None, :] < (m % steps)).long()  # (B, S)
    return base + extra


def block_bounds(prompt_length: int, gen_length: int, block_length: int) -> list[tuple[int, int]]:
    """Absolute ``[start, end)`` of each semi-autoregressive block of the generation."""
    if gen_length < 1:
        raise LladaError(f"gen_length must be >= 1, got {gen_length}")
    if block_length < 1 or gen_length % block_length:
        raise LladaError(
            f"block_length={block_length} must divide gen_length={gen_length}; pick a divisor"
        )
    return [
        (prompt_length + s, prompt_length + s + block_length) for s in range(0, gen_length, block_length)
    ]


def steps_per_block(steps: int, num_blocks: int) -> int:
    """Steps are split evenly over blocks; refuse uneven splits instead of silently rounding."""
    if steps < num_blocks or steps % num_blocks:
        raise LladaError(
            f"steps={steps} must be a positive multiple of the number of blocks ({num_blocks}) "
            "= gen_length / block_length"
        )
    return steps // num_blocks


def model_logits(
    model: torch.nn.Module,
    x: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor | None,  # (B, L) or None
    prompt_length: int,
    mask_token_id: int,
    cfg_scale: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Logits in fp32, (B, L, V), with optional classifier-free guidance; also the passes spent.

    The MASK logit is left as the model gave it: the released sampler's confidence is the
    full softmax, MASK in the denominator. Only the choice of token excludes MASK
    (``sample_tokens(..., mask_token_id=...)``).

    The unconditional pass replaces the prompt by MASK; guided logits are
    ``un + (w + 1) * (cond - un)``. Both passes run as one doubled batch.
    """
    calls = 1
    if cfg_scale > 0:
        un_x = x.clone()
        un_x[:, :prompt_length] = mask_token_id
        both = torch.cat([x, un_x], dim=0)  # (2B, L)
        attn = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
        cond, un = _call(model, both, attn).chunk(2, dim=0)
        logits, calls = un + (cfg_scale + 1.0) * (cond - un), 2
    else:
        logits = _call(model, x, attention_mask)
    return logits, calls


def _call(model: torch.nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    out = model(x, attention_mask=attention_mask)
    # accept Hugging Face style outputs (``.logits``) as well as plain tensors
    return getattr(out, "logits", out).float()


def sample_tokens(
    logits: torch.Tensor,  # (B, L, V)
    temperature: float,
    generator: torch.Generator | None = None,
    *,
    mask_token_id: int | None = None,
) -> torch.Tensor:
    """Argmax at temperature 0; otherwise Gumbel-max on ``logits / T`` in float64, (B, L).

    ``mask_token_id`` is never chosen: an (untrained) model predicting MASK would stall the
    sampler. Only the choice excludes it; ``logits`` is not modified, so the confidence
    (``chosen_probability``) and ``entropy`` still see MASK's mass, as the released sampler's
    softmax does. Where MASK is not the argmax the choice is the released one.

    float64 matters: with low-precision Gumbel noise, low-probability tokens are sampled
    too often, which hurts masked-diffusion generation quality.
    """
    if temperature <= 0:
        if mask_token_id is None:
            return logits.argmax(dim=-1)
        # a transient copy, freed before any softmax: peak memory is unchanged
        return logits.index_fill(-1, _ids([mask_token_id], logits), NEG_INF).argmax(dim=-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=_gen_device(generator, logits))
    u = u.to(logits.device).clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    gumbel = -torch.log(-torch.log(u))
    scores = logits.double() / temperature + gumbel  # (B, L, V), a new tensor
    if mask_token_id is not None:
        scores[..., mask_token_id] = NEG_INF
    return scores.argmax(dim=-1)


def random_uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) draws on ``like``'s device, from ``generator`` when given."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator, like)).to(like.device)


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _ids(token_ids: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Token ids as a long tensor on ``like``'s device (for ``index_fill``)."""
    return torch.as_tensor(list(token_ids), dtype=torch.long, device=like.device)


def apply_eos_rules(
    logits: torch.Tensor,  # (B, L, V), modified in place
    forbid_eos: bool,
    eos_token_id: int | None,
) -> torch.Tensor:
    """Forbid EOS (logit -inf) when asked: the model can then never choose to stop."""
    if forbid_eos:
        if eos_token_id is None:
            raise LladaError("forbid_eos=True needs eos_token_id")
        logits[..., eos_token_id] = NEG_INF
    return logits


def chosen_probability(
    logits: torch.Tensor, chosen: torch.Tensor, exclude: Sequence[int] = ()
) -> torch.Tensor:
    """softmax(logits) at the chosen token, (B, L): the low-confidence score.

    The softmax runs over the whole vocabulary, MASK included (as the released sampler's
    ``F.softmax(logits)``): a position where the model still puts mass on MASK scores lower,
    which decides its rank among the positions.

    ``exclude`` (EOS/EoT under ``eos_zero_confidence``) follows the released sampler's
    ``confidence_eos_eot_inf``: their logits become -inf *before* the softmax, so a position
    that chose one scores exactly 0 and every other position's probability is renormalised
    over the remaining tokens (which raises it). ``logits`` is not modified.
    """
    if exclude:
        logits = logits.index_fill(-1, _ids(exclude, logits), NEG_INF)
    p = torch.softmax(logits, dim=-1)  # (B, L, V)
    return p.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each position's predicted distribution, (B, L).

    Over the full softmax, MASK included, like the probability confidence and the reference
    entropy samplers (Dream/Fast-dLLM ``neg_entropy``: ``softmax(logits)`` of the whole head).
    """
    # entr(p) = -p log p with entr(0) = 0, so -inf logits (forbidden tokens) add nothing
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)


def top_k_mask(confidence: torch.Tensor, k: torch.Tensor, ties: str = "stable") -> torch.Tensor:
    """Bool (B, L): the ``k[row]`` highest-confidence positions per row (-inf never chosen).

    ``ties="stable"``: a stable sort breaks ties by position (deterministic everywhere).
    ``ties="topk"``: ``torch.topk`` per row, as the released sampler does, so ties (e.g. the
    zero confidences of ``eos_zero_confidence``) are broken the way it breaks them.
    """
    if ties == "topk":
        out = torch.zeros_like(confidence, dtype=torch.bool)
        for row in range(confidence.shape[0]):
            _, index = torch.topk(confidence[row], k=int(k[row]))
            out[row, index] = True
        return out & (confidence > NEG_INF)
    if ties != "stable":
        raise LladaError(f"top_k_mask ties={ties!r} is unknown: use 'stable' or 'topk'")
    order = confidence.argsort(dim=1, descending=True, stable=True)  # (B, L)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < k.view(-1, 1)) & (confidence > NEG_INF)


def region_mask(length: int, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Bool (L,) true on ``[start, end)``."""
    pos = torch.arange(length, device=device)
    return (pos >= start) & (pos < end)


def init_canvas(
    prompt_ids: torch.Tensor,  # (B, P)
    gen_length: int,
    mask_token_id: int,
    attention_mask: torch.Tensor | None,  # (B, P) or None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt followed by ``gen_length`` MASK tokens, and the attention mask extended to it."""
    if prompt_ids.dim() != 2:
        raise LladaError(f"prompt_ids must be (batch, length), got shape {tuple(prompt_ids.shape)}")
    B = prompt_ids.shape[0]
    dev = prompt_ids.device
    gen = torch.full((B, gen_length), mask_token_id, dtype=torch.long, device=dev)
    x = torch.cat([prompt_ids.long(), gen], dim=1)  # (B, P + G)
    attn = None
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise LladaError(
                f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}"
            )
        # an all-ones mask changes nothing: drop it for the faster unmasked attention path
        if not bool(attention_mask.bool().all()):
            attn = torch.cat([attention_mask.long().to(dev), torch.ones_like(gen)], dim=1)
    return x, attn


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar when ``enabled``; a silent stand-in otherwise."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
