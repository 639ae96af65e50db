"""Inference methods of SPEC §7: threshold decoding + KV cache, MED, infilling, HEX, TOLERATOR."""

from __future__ import annotations

import math

import pytest
import torch

from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, ModelConfig, PrefixCache
from llada_train.sample import (
    fast_generate,
    generate,
    hex_generate,
    infill_generate,
    left_pad,
    majority_vote,
    med_generate,
    refinement_fractions,
    tolerator_generate,
)
from llada_train.sample.common import entropy
from llada_train.sample.med import entropy_commit
from llada_train.sample.tolerator import _PenalizedModel, split_budget

MASK, EOS, PAD = 23, 1, 1


@pytest.fixture(scope="module")
def model() -> LLaDAModel:
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden_size=64, vocab_size=24,
        mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=0, init_std=1.0,
    )
    m = LLaDAModel(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


@pytest.fixture(scope="module")
def prompts():
    return left_pad([[3, 4, 5, 9], [6, 7]], PAD)


class Counting:
    """Wraps a model and counts its forward passes (an independent NFE check)."""

    def __init__(self, model):
        self.model, self.calls, self.inputs = model, 0, []

    def __call__(self, x, attention_mask=None):
        self.calls += 1
        self.inputs.append(x.clone())
        return self.model(x, attention_mask=attention_mask)


# ---------------------------------------------------------------- threshold decoding, KV cache


def test_cached_forward_equals_model(model):
    x = torch.randint(0, MASK, (2, 11), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 11, dtype=torch.long)
    attn[1, :3] = 0
    cache = PrefixCache(keep=6)
    with torch.no_grad():
        ref = model(x, attention_mask=attn)
        full = model(x, attention_mask=attn, cache=cache)  # records positions [0, 6)
        suffix = model(x[:, 6:], attention_mask=attn, cache=cache)
    assert torch.allclose(full, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(suffix, ref[:, 6:], atol=1e-4, rtol=1e-4)  # exact when the cache is fresh
    assert cache.keys[0].shape == (2, 1, 6, 16)


def test_threshold_decoding_limits(model, prompts):
    ids, attn = prompts
    one_per_step = generate(model, ids, 12, 12, 4, mask_token_id=MASK, attention_mask=attn)
    # threshold 1 is never reached: exactly the most confident token per step
    strict = fast_generate(model, ids, 12, 4, threshold=1.0, mask_token_id=MASK, attention_mask=attn)
    assert torch.equal(strict.tokens, one_per_step.tokens) and strict.nfe == 12
    # threshold ~0 commits a whole block per call
    loose = fast_generate(model, ids, 12, 4, threshold=1e-9, mask_token_id=MASK, attention_mask=attn)
    assert loose.nfe == 3 and not (loose.generated == MASK).any()
    # the fixed schedule through the fast path equals generate
    fixed = fast_generate(model, ids, 12, 4, threshold=None, steps=6, mask_token_id=MASK, attention_mask=attn)
    assert torch.equal(fixed.tokens, generate(model, ids, 12, 6, 4, mask_token_id=MASK, attention_mask=attn).tokens)


def test_threshold_commits_only_confident_tokens(model, prompts):
    ids, attn = prompts
    rec = Counting(model)
    tau = 0.6
    out = fast_generate(rec, ids, 12, 12, threshold=tau, mask_token_id=MASK, attention_mask=attn)
    assert out.nfe == rec.calls
    inputs = rec.inputs + [out.tokens]
    multi = 0
    for before, after in zip(inputs[:-1], inputs[1:], strict=True):
        with torch.no_grad():
            logits = model(before, attention_mask=torch.cat([attn, torch.ones(2, 12, dtype=torch.long)], 1))
        choice = logits.index_fill(-1, torch.tensor([MASK]), float("-inf")).argmax(-1, keepdim=True)
        p = torch.softmax(logits, -1).gather(-1, choice).squeeze(-1)  # (B, L), MASK in the denominator
        for r in range(2):
            changed = (before[r] != after[r]).nonzero().view(-1)
            assert len(changed) >= 1 or not (before[r] == MASK).any()
            if len(changed) > 1:
                multi += 1
                assert (p[r, changed] >= tau).sum() >= len(changed) - 1
            still = (after[r] == MASK).nonzero().view(-1)
            assert (p[r, still] < tau).all()
    assert out.nfe < 12  # some step committed more than one token
    assert multi > 0


def test_kv_cache_decoding(model, prompts):
    ids, attn = prompts
    rec = Counting(model)
    # the cached path runs the model's blocks itself, so it is not wrapped
    cached = fast_generate(model, ids, 12, 4, threshold=None, steps=12, use_cache=True,
                           mask_token_id=MASK, attention_mask=attn)
    plain = fast_generate(rec, ids, 12, 4, threshold=None, steps=12, mask_token_id=MASK, attention_mask=attn)
    assert cached.nfe == plain.nfe == rec.calls == 12
    assert not (cached.generated == MASK).any()
    # the first step of each block uses a fresh full pass, so the first committed token agrees
    first = (rec.inputs[1] != rec.inputs[0])
    assert torch.equal(cached.tokens[first], plain.tokens[first])
    with pytest.raises(LladaError):
        fast_generate(model, ids, 12, 4, use_cache=True, cfg_scale=1.0, mask_token_id=MASK)


# ---------------------------------------------------------------- MED and infilling


def test_entropy_commit_rule():
    # entropies: a near one-hot row (~0), a flatter one, a uniform one
    V = 4
    sharp = torch.tensor([20.0, 0, 0, 0])
    mid = torch.tensor([3.0, 0, 0, 0])
    flat = torch.zeros(V)
    logits = torch.stack([flat, mid, sharp, sharp, flat])[None]  # (1, 5, V)
    h = entropy(logits)[0]
    assert h[2] < 0.01 < h[1] < h[0]
    x = torch.full((1, 5), MASK)
    cand = torch.ones(1, 5, dtype=torch.bool)
    _, commit = entropy_commit(x, logits, cand, 0.1, 0.0, None)
    assert commit[0].tolist() == [False, False, True, True, False]  # both under lambda
    _, commit = entropy_commit(x, logits, cand, float(h[1]) + 1e-3, 0.0, None)
    assert commit[0].tolist() == [False, True, True, True, False]
    _, commit = entropy_commit(x, logits, cand, 0.0, 0.0, None)
    assert commit.sum() == 1 and bool(commit[0, 2])  # nothing under lambda: only the lowest
    cand[0, 2:4] = False
    _, commit = entropy_commit(x, logits, cand, 0.0, 0.0, None)
    assert commit[0].tolist() == [False, True, False, False, False]


def test_med_multi_commits_only_under_threshold(model, prompts):
    ids, attn = prompts
    full_attn = torch.cat([attn, torch.ones(2, 12, dtype=torch.long)], 1)
    x0 = torch.cat([ids, torch.full((2, 12), MASK)], 1)
    with torch.no_grad():
        h0 = entropy(model(x0, attention_mask=full_attn).float())[:, 4:]
    lam = float(h0.flatten().quantile(0.4))  # some positions under lambda, most not
    rec = Counting(model)
    out = med_generate(rec, ids, 12, mask_token_id=MASK, entropy_threshold=lam, attention_mask=attn)
    assert out.nfe == rec.calls < 12
    inputs = rec.inputs + [out.tokens]
    multi = 0
    for before, after in zip(inputs[:-1], inputs[1:], strict=True):
        with torch.no_grad():
            logits = model(before, attention_mask=full_attn).float()
        h = entropy(logits)  # the full softmax's, MASK included
        for r in range(2):
            changed = (before[r] != after[r]).nonzero().view(-1)
            if len(changed) > 1:
                multi += 1
                under = h[r, changed] < lam
                assert under.sum() >= len(changed) - 1  # all but the forced lowest are under lambda
            still = ((after[r] == MASK) & (before[r] == MASK)).nonzero().view(-1)
            assert (h[r, still] >= lam).all()
    assert multi > 0
    # lambda = 0: exactly one token per step
    one = med_generate(model, ids, 12, mask_token_id=MASK, entropy_threshold=0.0, attention_mask=attn)
    assert one.nfe == 12


def test_infill_answer_conditioned_and_early_exit(model, prompts):
    ids, attn = prompts
    delim = [20, 21]
    answer = torch.tensor([[5, 6], [7, 8]])
    cond = infill_generate(model, ids, 6, delim, mask_token_id=MASK, answer_ids=answer, attention_mask=attn)
    assert torch.equal(cond.answer, answer)
    assert not (cond.reasoning == MASK).any()
    assert cond.tokens[:, 10:12].tolist() == [delim, delim]
    # gamma huge: the answer is settled at the first call and filled by argmax
    rec = Counting(model)
    fast = infill_generate(rec, ids, 6, delim, 2, mask_token_id=MASK, answer_entropy_threshold=1e9,
                           attention_mask=attn)
    assert fast.nfe == 1 and fast.early_exit.all()
    assert not (fast.answer == MASK).any() and (fast.reasoning == MASK).all()
    # gamma 0: never settled early, so everything is decoded
    slow = infill_generate(model, ids, 6, delim, 2, mask_token_id=MASK, answer_entropy_threshold=0.0,
                           entropy_threshold=0.0, attention_mask=attn)
    assert not slow.early_exit.any()
    assert slow.nfe > 1 and not (slow.answer == MASK).any()


# ---------------------------------------------------------------- HEX


def test_majority_vote_and_ties():
    assert majority_vote(["1", "2", "2"]) == "2"
    assert majority_vote(["7", "3"]) == "7"  # tie: first listed (smallest block) wins
    assert majority_vote(["3", "1", "1", "3", "5"]) == "3"
    assert majority_vote([None, "4", None, "9", "9"]) == "9"  # failed extractions do not vote
    assert majority_vote([None, None]) is None


def test_hex_members_and_vote(model, prompts):
    ids, attn = prompts
    blocks = (2, 4, 12)

    def decode(row):
        return " ".join(map(str, row))

    def extract(text):
        return text.split()[0]  # first generated token as the "answer"

    out = hex_generate(model, ids, 12, mask_token_id=MASK, decode=decode, extract=extract,
                       block_lengths=blocks, tokens_per_step=2, attention_mask=attn)
    assert out.nfe == 3 * 6
    for j, b in enumerate(blocks):
        single = generate(model, ids, 12, 6, b, mask_token_id=MASK, attention_mask=attn)
        assert torch.equal(out.member_tokens[j], single.tokens)
        for r in range(2):
            assert out.member_answers[r][j] == str(int(single.generated[r, 0]))
    for r in range(2):
        assert out.answers[r] == majority_vote(out.member_answers[r])
    with pytest.raises(LladaError):
        hex_generate(model, ids, 12, mask_token_id=MASK, decode=decode, extract=extract, block_lengths=(3,))


# ---------------------------------------------------------------- TOLERATOR


def test_refinement_schedule():
    g = refinement_fractions(5)
    assert math.isclose(g[0], 0.8) and math.isclose(g[-1], 0.4)
    assert all(a > b for a, b in zip(g, g[1:], strict=False))
    assert math.isclose(g[2], 0.6)  # cosine midpoint
    assert split_budget(16, 12, 3, 0.5) == (6, 10)
    assert split_budget(40, 12, 1, 0.5) == (12, 28)  # fill-up is capped at one token per step


@pytest.mark.parametrize("budget,block", [(12, 12), (7, 4), (20, 4)])
def test_tolerator_keeps_budget(model, prompts, budget, block):
    ids, attn = prompts
    rec = Counting(model)
    out = tolerator_generate(rec, ids, 12, budget, mask_token_id=MASK, eot_token_ids=[EOS],
                             block_length=block, attention_mask=attn, generator=torch.Generator().manual_seed(0))
    assert out.nfe == budget == rec.calls
    assert not (out.generated == MASK).any()
    assert torch.equal(out.tokens[:, :4], ids)


def test_tolerator_refinement_remasks_the_scheduled_fractions(model, prompts):
    ids, attn = prompts
    rec = Counting(model)
    G, budget = 12, 9  # fill-up: round(0.5 * 9) = 4 steps (a multiple of 1 block), then 5 rounds
    tolerator_generate(rec, ids, G, budget, mask_token_id=MASK, gamma_start=0.5, gamma_end=0.25,
                       attention_mask=attn, generator=torch.Generator().manual_seed(0))
    # cosine 0.5 -> 0.25 over 5 rounds, times 12 positions: 6, 5.56, 4.5, 3.44, 3, rounded half-even
    expected = [6, 6, 4, 3, 3]
    masked = [(x[:, ids.shape[1]:] == MASK).sum(1).tolist() for x in rec.inputs[4:]]
    assert masked == [[n] * ids.shape[0] for n in expected]
    with pytest.raises(LladaError, match="gamma_start"):
        tolerator_generate(model, ids, G, budget, mask_token_id=MASK, gamma_start=1.5)


def test_eot_penalty_divides_probability(model):
    x = torch.tensor([[3, 4, MASK, MASK]])
    with torch.no_grad():
        p = torch.softmax(model(x).float(), -1)
        q = torch.softmax(_PenalizedModel(model, [EOS], 1.5)(x), -1)
    ratio = (q[..., EOS] / q[..., 5]) / (p[..., EOS] / p[..., 5])
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / 1.5), rtol=1e-4)
