"""``eos_zero_confidence`` equals the released sampler's ``confidence_eos_eot_inf`` rule.

The reference below is the released ``generate()`` loop (temperature 0, low-confidence
remasking) written out line by line: the EOS/EoT logits become -inf after the argmax and
*before* the softmax, and ``torch.topk`` picks the positions, ties included.
"""

from __future__ import annotations

import pytest
import torch

from llada_train.sample import generate
from llada_train.sample.common import (
    NEG_INF,
    block_bounds,
    chosen_probability,
    num_transfer_schedule,
    region_mask,
    sample_tokens,
    top_k_mask,
)
from tests import released_llada

V, MASK, EOS, EOT = 40, 39, 1, 5


class ToyModel:
    """Logits depend on the canvas; EOS/EoT win at many positions, so confidences tie at 0."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, V, generator=g)
        self.pos = torch.randn(64, V, generator=g)
        self.pos[:, EOS] += 2.5
        self.pos[:, EOT] += 2.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.emb[x].cumsum(1) / 4  # (B, L, V): each position sees the canvas to its left
        logits = ctx + self.pos[: x.shape[1]]
        # MASK is never predicted (the released model in practice)
        logits[..., MASK] = -torch.inf
        return logits


def released_generate(model, prompt, steps, gen_length, block_length):
    """The released LLaDA ``generate`` with ``confidence_eos_eot_inf=True``, temperature 0."""
    return released_llada.released_generate(model, prompt, steps, gen_length, block_length,
                                            eos_eot=(EOS, EOT), mask_id=MASK)


def ours(model, prompt, steps, gen_length, block_length):
    """The package's sampler with ``eos_zero_confidence``."""
    return generate(
        lambda x, attention_mask=None: model(x), prompt, gen_length=gen_length, steps=steps,
        block_length=block_length, mask_token_id=MASK, eos_token_id=EOS, eot_token_id=EOT,
        eos_zero_confidence=True,
    ).tokens


def variant(model, prompt, steps, gen_length, block_length, released_rule, ties):
    """One step rule built from the package's pieces; counts zero-confidence ties."""
    P = prompt.shape[1]
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), MASK)], dim=1)
    blocks = block_bounds(P, gen_length, block_length)
    per_block = steps // len(blocks)
    tied = 0
    for start, end in blocks:
        in_block = region_mask(x.shape[1], start, end, x.device)
        schedule = num_transfer_schedule((x[:, start:end] == MASK).sum(1), per_block)
        for s in range(per_block):
            candidates = (x == MASK) & in_block
            logits = model(x)
            x0 = sample_tokens(logits, 0.0)
            if released_rule:
                conf = chosen_probability(logits, x0, exclude=(EOS, EOT))
            else:  # the rule before the fix: zero the stops, keep the others' probabilities
                conf = chosen_probability(logits, x0)
                conf = torch.where((x0 == EOS) | (x0 == EOT), torch.zeros_like(conf), conf)
            conf = torch.where(candidates, conf, torch.full_like(conf, NEG_INF))
            tied += int(((conf == 0).sum(1) >= 2).sum())
            commit = top_k_mask(conf, schedule[:, s], ties=ties)
            x = torch.where(commit, x0, x)
    return x, tied


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("steps,gen_length,block_length", [(24, 24, 24), (12, 24, 8), (8, 32, 16)])
def test_matches_the_released_confidence_eos_eot_inf_rule(seed, steps, gen_length, block_length):
    model = ToyModel(seed)
    prompt = torch.randint(6, 30, (3, 5), generator=torch.Generator().manual_seed(seed))
    want = released_generate(model, prompt, steps, gen_length, block_length)
    assert torch.equal(ours(model, prompt, steps, gen_length, block_length), want)


def test_the_cases_exercise_ties_and_tell_the_old_rule_apart():
    # guards the test above: zero-confidence ties occur, and both the old rule and the new
    # confidences with position-ordered ties give other tokens
    differ, differ_ties, ties = 0, 0, 0
    for seed in range(6):
        model = ToyModel(seed)
        prompt = torch.randint(6, 30, (3, 5), generator=torch.Generator().manual_seed(seed))
        new = ours(model, prompt, 24, 24, 24)
        _, n = variant(model, prompt, 24, 24, 24, released_rule=True, ties="topk")
        old, _ = variant(model, prompt, 24, 24, 24, released_rule=False, ties="stable")
        stable, _ = variant(model, prompt, 24, 24, 24, released_rule=True, ties="stable")
        ties += n
        differ += int(not torch.equal(new, old))
        differ_ties += int(not torch.equal(new, stable))
    assert ties > 0 and differ > 0 and differ_ties > 0


def test_chosen_probability_renormalises_without_the_stops_and_leaves_logits_alone():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 0.5]]])  # (1, 1, 4)
    before = logits.clone()
    p = chosen_probability(logits, torch.tensor([[2]]), exclude=(1,))
    assert torch.allclose(p, torch.softmax(torch.tensor([0.0, 2.0, 0.5]), 0)[1].view(1, 1))
    assert chosen_probability(logits, torch.tensor([[1]]), exclude=(1,)).item() == 0.0
    assert torch.equal(logits, before)
