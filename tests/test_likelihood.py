"""Monte Carlo conditional likelihood (SPEC §6) against the exact expectation by enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llada_train.diffusion.likelihood import (
    conditional_log_likelihood,
    random_answer_masks,
    stratified_mask_counts,
)
from llada_train.model import LLaDAModel, ModelConfig

MASK = 7


@pytest.fixture(scope="module")
def model() -> LLaDAModel:
    cfg = ModelConfig(
        d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=32, vocab_size=8,
        mask_token_id=MASK, eos_token_id=1, pad_token_id=1, bos_token_id=0, init_std=0.5,
    )
    m = LLaDAModel(cfg)
    m.init_weights(torch.Generator().manual_seed(3))
    return m.eval()


def exact_terms(model, prompt, answer, cfg_scale=0.0):
    """Every (probability, value) of the estimator's single-sample distribution (SPEC §6)."""
    P, L = len(prompt), len(answer)
    seq = torch.tensor(prompt + answer)
    terms = []
    for n_masked in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), n_masked))
        for subset in subsets:
            x = seq.clone()
            for i in subset:
                x[P + i] = MASK
            with torch.no_grad():
                logits = model(x[None]).float()
                if cfg_scale > 0:
                    un = x.clone()
                    un[:P] = MASK
                    ul = model(un[None]).float()
                    logits = ul + (cfg_scale + 1) * (logits - ul)
            logp = torch.log_softmax(logits[0], -1)
            value = (L / n_masked) * sum(float(logp[P + i, answer[i]]) for i in subset)
            terms.append((1 / L / len(subsets), value))
    return terms


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_mc_mean_converges_to_exact_expectation(model, cfg_scale):
    prompt, answer = [3, 4], [5, 2, 6]
    terms = exact_terms(model, prompt, answer, cfg_scale)
    assert math.isclose(sum(p for p, _ in terms), 1.0)
    mean = sum(p * v for p, v in terms)
    var = sum(p * (v - mean) ** 2 for p, v in terms)
    n = 3000
    est = conditional_log_likelihood(
        model, prompt, answer, mask_token_id=MASK, generator=torch.Generator().manual_seed(0),
        n_samples=n, batch_size=60, cfg_scale=cfg_scale,
    )
    # stratifying l within a batch does not raise the variance above the iid one
    assert abs(est - mean) < 4 * math.sqrt(var / n)
    # a few samples are noisier than many: the estimate is not a constant
    few = [
        conditional_log_likelihood(model, prompt, answer, mask_token_id=MASK,
                                   generator=torch.Generator().manual_seed(s), n_samples=2, batch_size=2,
                                   cfg_scale=cfg_scale)
        for s in range(4)
    ]
    assert len({round(f, 6) for f in few}) > 1


def test_single_token_answer_is_exact(model):
    prompt, answer = [3, 4, 2], [5]
    x = torch.tensor([prompt + [MASK]])
    with torch.no_grad():
        want = float(torch.log_softmax(model(x).float()[0, -1], -1)[5])
    got = conditional_log_likelihood(model, prompt, answer, mask_token_id=MASK,
                                     generator=torch.Generator().manual_seed(1), n_samples=128)
    assert math.isclose(got, want, rel_tol=1e-5)


def test_prompt_never_masked_and_seeded(model):
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, attention_mask=None):
            seen.append(x.clone())
            return self.inner(x)

    rec = Recorder()
    prompt, answer = [3, 4, MASK - 1], [5, 2, 6, 1]
    a = conditional_log_likelihood(rec, prompt, answer, mask_token_id=MASK,
                                   generator=torch.Generator().manual_seed(5), n_samples=16, batch_size=8)
    b = conditional_log_likelihood(model, prompt, answer, mask_token_id=MASK,
                                   generator=torch.Generator().manual_seed(5), n_samples=16, batch_size=8)
    assert a == b
    assert len(seen) == 2
    for x in seen:
        assert (x[:, :3] == torch.tensor(prompt)).all()
        masked = (x[:, 3:] == MASK).sum(1)
        assert (masked >= 1).all()  # l >= 1 always


def test_stratified_counts_are_uniform_per_row():
    L, B = 5, 3
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_mask_counts(L, B, g) for _ in range(3000)])  # (N, B)
    assert draws.min() >= 1 and draws.max() <= L
    for row in range(B):
        freq = torch.bincount(draws[:, row], minlength=L + 1)[1:].double() / len(draws)
        assert torch.allclose(freq, torch.full((L,), 1 / L, dtype=torch.float64), atol=0.03)
    # within a batch the counts are spread out, not independent
    assert (draws[:, 0] != draws[:, 1]).all()
    masks = random_answer_masks(torch.tensor([1, 3, 5]), L, g)
    assert masks.sum(1).tolist() == [1, 3, 5]
