"""HEX: an ensemble over semi-autoregressive block sizes with a majority vote (arXiv 2510.05040).

Each block size is a different unmasking order; the same prompt is decoded once per block
size, each final answer is extracted, and the most frequent answer wins. Ties go to the
answer that appears first in ``block_lengths`` order (the smallest block by default).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llada_train.errors import LladaError
from llada_train.sample.generate import generate

Decoder = Callable[[Sequence[int]], str]  # generated token ids -> text
Extractor = Callable[[str], str | None]  # text -> final answer, None when absent


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the one listed first; None if all None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


@dataclass
class HexOutput:
    """Voted answers per prompt plus every member's text and answer."""

    answers: list[str | None]  # (B,) voted answer per prompt
    member_answers: list[list[str | None]]  # [B][n_members]
    member_texts: list[list[str]]  # [B][n_members]
    block_lengths: list[int]
    nfe: int  # total forward passes over all members
    member_tokens: list[torch.Tensor] = field(default_factory=list)  # n_members x (B, P + G)


@torch.no_grad()
def hex_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P)
    gen_length: int,
    *,
    mask_token_id: int,
    decode: Decoder,
    extract: Extractor,
    block_lengths: Sequence[int] = (8, 16, 32, 64, 128),
    tokens_per_step: int = 2,
    attention_mask: torch.Tensor | None = None,  # (B, P)
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **generate_kwargs,
) -> HexOutput:
    """Decode with each block length (``gen_length / tokens_per_step`` steps each) and vote.

    ``decode`` turns a row's generated ids into text (stopping at EOS is its job) and
    ``extract`` pulls the final answer out of that text. Extra keyword arguments go to
    ``generate`` (e.g. ``cfg_scale``, ``eos_token_id``, ``forbid_eos``).
    """
    if not block_lengths:
        raise LladaError("hex_generate: block_lengths is empty")
    if gen_length % tokens_per_step:
        raise LladaError(f"tokens_per_step={tokens_per_step} must divide gen_length={gen_length}")
    steps = gen_length // tokens_per_step
    for b in block_lengths:
        if gen_length % b or b % tokens_per_step:
            raise LladaError(
                f"HEX block length {b}: it must divide gen_length={gen_length} and be a multiple of "
                f"tokens_per_step={tokens_per_step}"
            )
    B = prompt_ids.shape[0]
    texts: list[list[str]] = [[] for _ in range(B)]
    answers: list[list[str | None]] = [[] for _ in range(B)]
    members: list[torch.Tensor] = []
    nfe = 0
    for b in block_lengths:
        out = generate(
            model, prompt_ids, gen_length=gen_length, steps=steps, block_length=b,
            temperature=temperature, mask_token_id=mask_token_id, attention_mask=attention_mask,
            generator=generator, progress=progress, **generate_kwargs,
        )
        nfe += out.nfe
        members.append(out.tokens)
        for i, row in enumerate(out.generated.tolist()):
            text = decode(row)
            texts[i].append(text)
            answers[i].append(extract(text))
    return HexOutput(
        answers=[majority_vote(a) for a in answers],
        member_answers=answers,
        member_texts=texts,
        block_lengths=list(block_lengths),
        nfe=nfe,
        member_tokens=members,
    )
