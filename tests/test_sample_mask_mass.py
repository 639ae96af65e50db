"""The sampler's confidence is the released one's even where the model puts mass on MASK.

The released LLaDA ``generate()`` takes ``x0 = argmax(logits)`` and scores it with
``softmax(logits)[x0]``, MASK inside the softmax. Our guard (never commit MASK) acts on the
choice only. Setting the MASK logit to -inf before the softmax (the old ``forbid_mask``)
instead rescales every confidence by its own position's ``1 / (1 - p(MASK))``, which
reorders the positions when p(MASK) is large and varies (early checkpoints, the
unconditional half of CFG). The model below is built so: MASK gets real, position-dependent
mass but is never the argmax, so the released loop and ours must agree token for token.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from llada_train.model import LLaDAModel, ModelConfig
from llada_train.sample import (
    fast_generate,
    generate,
    infill_generate,
    med_generate,
    tolerator_generate,
)
from llada_train.sample.common import (
    NEG_INF,
    chosen_probability,
    entropy,
    model_logits,
    sample_tokens,
)
from tests.released_llada import released_generate

# the module, not the ``generate`` function the package exports under the same name
generate_module = importlib.import_module("llada_train.sample.generate")

V, MASK, EOS, PAD = 32, 31, 1, 1
# (steps, gen_length, block_length): semi-AR blocks, one block with one token per step, and
# an uneven schedule (12 masks over 5 steps per block: 3, 3, 2, 2, 2)
CASES = [(16, 32, 8), (24, 24, 24), (10, 24, 12)]
SEEDS = range(3)  # three models, four prompts each: 12 rows per case


def _mask_logit_by_hand(lo: float, span: float):
    """A head hook: MASK's logit = best other logit - gap, gap in (lo, lo + span) per position.

    The gap follows the head's own (random) MASK logit, so p(MASK) is substantial and varies
    by position. MASK is never the argmax; with ``2 * lo > lo + span`` neither is it under
    CFG with w = 1: guided MASK = 2 (top_c - gap_c) - (top_u - gap_u) < 2 top_c - top_u, which
    the conditional argmax token reaches at least.
    """

    def hook(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        others = out.index_fill(-1, torch.tensor([MASK], device=out.device), NEG_INF)  # (B, L, V)
        gap = lo + span * torch.sigmoid(out[..., MASK])  # (B, L)
        out = out.clone()
        out[..., MASK] = others.max(-1).values - gap
        return out

    return hook


def mask_mass_model(seed: int, lo: float = 0.4, span: float = 0.35) -> LLaDAModel:
    """A tiny seeded LLaDAModel whose MASK logit is set by hand (see ``_mask_logit_by_hand``)."""
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden_size=64, vocab_size=V,
        mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=0, init_std=1.0,
    )
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    model.transformer.ff_out.register_forward_hook(_mask_logit_by_hand(lo, span))
    return model.eval()


def prompts(seed: int) -> torch.Tensor:
    """Four prompts of five tokens, (4, 5); no MASK among them."""
    return torch.randint(2, MASK, (4, 5), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@functools.cache
def released_tokens(seed: int, case: tuple[int, int, int], cfg_scale: float) -> torch.Tensor:
    """The released loop's output for one seed and case, computed once for both tests below."""
    return released_generate(mask_mass_model(seed), prompts(seed), *case, cfg_scale=cfg_scale, mask_id=MASK)


def ours(model, prompt, steps, gen_length, block_length, cfg_scale=0.0) -> torch.Tensor:
    """The package's low-confidence sampler, greedy."""
    return generate(
        model, prompt, gen_length=gen_length, steps=steps, block_length=block_length,
        mask_token_id=MASK, cfg_scale=cfg_scale,
    ).tokens


# ---------------------------------------------------------------- the model is a real test


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_mask_gets_varied_mass_but_is_never_the_argmax(cfg_scale):
    record: list = []
    for seed in SEEDS:
        released_generate(mask_mass_model(seed), prompts(seed), *CASES[0], cfg_scale=cfg_scale, record=record,
                          mask_id=MASK)
    p_mask = torch.cat([p for p, _ in record])  # p(MASK) at every masked position of every step
    assert sum(n for _, n in record) == 0  # the released argmax never picks MASK: equality is testable
    assert p_mask.mean() > 0.05 and p_mask.max() > 0.3  # real mass on MASK ...
    assert p_mask.max() - p_mask.min() > 0.25  # ... that differs from position to position


# ---------------------------------------------------------------- token-for-token equality


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("steps,gen_length,block_length", CASES)
@pytest.mark.parametrize("seed", SEEDS)
def test_low_confidence_matches_the_released_loop(seed, steps, gen_length, block_length, cfg_scale):
    model, prompt = mask_mass_model(seed), prompts(seed)
    want = released_tokens(seed, (steps, gen_length, block_length), cfg_scale)
    assert torch.equal(ours(model, prompt, steps, gen_length, block_length, cfg_scale), want)
    # the fixed-schedule fast path scores the same way
    fast = fast_generate(
        model, prompt, gen_length, block_length, mask_token_id=MASK, threshold=None, steps=steps,
        cfg_scale=cfg_scale,
    )
    assert torch.equal(fast.tokens, want)


def test_the_old_forbid_mask_renormalisation_fails_the_comparison(monkeypatch):
    # guards the test above: the old model_logits (MASK logit -inf before the softmax) gives
    # other tokens on this model, in every case and under CFG
    def old_model_logits(*args, **kwargs):
        logits, calls = model_logits(*args, **kwargs)
        logits[..., MASK] = NEG_INF  # the removed forbid_mask
        return logits, calls

    differ = {}
    for cfg_scale in (0.0, 1.0):
        for case in CASES:
            rows = 0
            for seed in SEEDS:
                model, prompt = mask_mass_model(seed), prompts(seed)
                want = released_tokens(seed, case, cfg_scale)
                with monkeypatch.context() as m:
                    m.setattr(generate_module, "model_logits", old_model_logits)
                    old = ours(model, prompt, *case, cfg_scale=cfg_scale)
                rows += int((old != want).any(1).sum())
            differ[cfg_scale, case] = rows
    assert all(rows > 0 for rows in differ.values()), differ
    assert sum(differ.values()) >= len(differ) * 4 * len(SEEDS) // 2, differ  # at least half of all rows


# ---------------------------------------------------------------- the guard: MASK is never committed


def test_no_sampler_commits_mask_even_when_it_is_the_argmax():
    # gap < 0: MASK beats every other token at every position
    model = mask_mass_model(0, lo=-3.0, span=1.0)
    prompt = prompts(0)
    with torch.no_grad():
        assert (model(torch.full((1, 8), MASK)).argmax(-1) == MASK).all()
    g = torch.Generator().manual_seed(0)
    outs = [
        generate(model, prompt, 16, 8, 8, mask_token_id=MASK),
        generate(model, prompt, 16, 8, 8, temperature=1.0, mask_token_id=MASK, generator=g),
        generate(model, prompt, 16, 8, 8, remasking="random", mask_token_id=MASK, generator=g, cfg_scale=1.0),
        fast_generate(model, prompt, 16, 8, mask_token_id=MASK, threshold=0.5),
        fast_generate(model, prompt, 16, 8, mask_token_id=MASK, threshold=None, steps=8, use_cache=True),
        med_generate(model, prompt, 16, 8, mask_token_id=MASK, entropy_threshold=0.5),
        tolerator_generate(model, prompt, 16, 12, mask_token_id=MASK, refine_temperature=1.0, generator=g),
    ]
    for out in outs:
        assert not (out.generated == MASK).any()
    # the settled answer of infilling is filled by argmax: never MASK either
    infill = infill_generate(model, prompt, 6, [20], 2, mask_token_id=MASK, answer_entropy_threshold=1e9)
    assert infill.early_exit.all() and not (infill.answer == MASK).any()


# ---------------------------------------------------------------- the pieces


def test_choice_excludes_mask_but_the_scores_keep_its_mass():
    logits = torch.tensor([[[1.0, 0.0, 3.0, 2.0]]])  # (1, 1, 4); token 2 plays MASK and is the argmax
    before = logits.clone()
    assert sample_tokens(logits, 0.0).item() == 2
    assert sample_tokens(logits, 0.0, mask_token_id=2).item() == 3
    draws = sample_tokens(logits.expand(1, 4000, 4), 1.0, torch.Generator().manual_seed(0), mask_token_id=2)
    assert not (draws == 2).any() and (draws == 3).any() and (draws == 0).any()
    assert torch.equal(logits, before)  # the choice does not touch the logits
    full = torch.softmax(logits, -1)  # (1, 1, 4), MASK in the denominator
    assert torch.allclose(chosen_probability(logits, torch.tensor([[3]])), full[..., 3])
    assert torch.allclose(entropy(logits), -(full * full.log()).sum(-1))
