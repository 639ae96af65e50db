"""The block NELBO (issue 21) against its exact expectation, enumerated block by block.

The reference never uses the paired cat(x_t, x_0) pass: for each block j it runs the model
block-causally on the clean blocks before j followed by block j with a subset of its answer
tokens masked, for every subset, and weighs the terms as the estimator's draws would.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llada_train.diffusion.likelihood import conditional_log_likelihood
from llada_train.diffusion.likelihood_block import (
    answer_spans,
    block_conditional_log_likelihood,
    log_likelihood_bound,
)
from llada_train.errors import LladaError
from llada_train.eval.perplexity import PerplexityConfig, corpus_elbo
from llada_train.model import LLaDAModel, ModelConfig

MASK = 7


def tiny(block_size: int = 0) -> LLaDAModel:
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden_size=32, vocab_size=8,
                      mask_token_id=MASK, eos_token_id=1, pad_token_id=1, bos_token_id=0, init_std=0.5,
                      block_size=block_size)
    m = LLaDAModel(cfg)
    m.init_weights(torch.Generator().manual_seed(3))
    return m.eval()


@torch.no_grad()
def exact_blocks(model, prompt: list[int], answer: list[int], b: int) -> tuple[float, float]:
    """Mean and variance of one sample of the estimator: per block, every (l, subset) draw."""
    seq = prompt + answer
    P, T = len(prompt), len(seq)
    mean = var = 0.0
    for j in range(P // b, (T - 1) // b + 1):
        s, e = max(P, j * b), min(T, (j + 1) * b)
        n = e - s
        terms = []
        for count in range(1, n + 1):
            subsets = list(itertools.combinations(range(s, e), count))
            for subset in subsets:
                x = torch.tensor(seq[:e])  # clean blocks < j, then block j
                x[list(subset)] = MASK
                logp = torch.log_softmax(model(x[None], block_size=b)[0].double(), -1)
                value = n / count * sum(float(logp[i, seq[i]]) for i in subset)
                terms.append((1.0 / n / len(subsets), value))
        m = sum(p * v for p, v in terms)
        mean += m
        var += sum(p * (v - m) ** 2 for p, v in terms)  # blocks draw independently
    return mean, var


@pytest.mark.parametrize("prompt, answer, b", [
    ([3, 4], [5, 2, 6, 1, 4], 3),  # answer in blocks 0, 1, 2: the paired pass
    ([3, 4, 6], [5, 2, 4], 3),  # one answer block after a clean prompt block: block-causal 1L
    ([3], [5, 2, 6], 4),  # one block holds everything: full diffusion
])
def test_mc_mean_converges_to_the_exact_block_bound(prompt, answer, b):
    model = tiny(b)
    mean, var = exact_blocks(model, prompt, answer, b)
    n = 3000
    est = block_conditional_log_likelihood(model, prompt, answer, block_size=b, mask_token_id=MASK,
                                           generator=torch.Generator().manual_seed(0),
                                           n_samples=n, batch_size=60)
    # stratified counts only lower the variance: the iid bound on the error is conservative
    assert abs(est - mean) < 4 * math.sqrt(var / n), (est, mean, math.sqrt(var / n))
    few = {round(block_conditional_log_likelihood(
        model, prompt, answer, block_size=b, mask_token_id=MASK,
        generator=torch.Generator().manual_seed(s), n_samples=2, batch_size=2), 6) for s in range(4)}
    assert len(few) > 1  # an estimate, not a constant


def test_block_bound_differs_from_the_full_bound_on_the_same_weights():
    full, blocky = tiny(0), tiny(3)
    prompt, answer = [3, 4], [5, 2, 6, 1, 4]
    assert not math.isclose(exact_blocks(blocky, prompt, answer, 3)[0],
                            exact_blocks(full, prompt, answer, 7)[0], rel_tol=1e-3)


def test_one_block_is_the_full_diffusion_estimator_draw_for_draw():
    model = tiny(0)
    prompt, answer = [3, 4], [5, 2, 6, 1]
    for seed in range(3):
        got = block_conditional_log_likelihood(model, prompt, answer, block_size=8, mask_token_id=MASK,
                                               generator=torch.Generator().manual_seed(seed),
                                               n_samples=12, batch_size=5)
        want = conditional_log_likelihood(model, prompt, answer, mask_token_id=MASK,
                                          generator=torch.Generator().manual_seed(seed),
                                          n_samples=12, batch_size=5)
        assert got == want


def test_one_answer_token_per_block_is_exact_and_the_prompt_is_never_masked():
    model = tiny(2)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, x, attention_mask=None, **kw):
            seen.append((x.clone(), kw))
            return self.inner(x, attention_mask=attention_mask, **kw)

    prompt, answer = [3], [5, 2]  # blocks [3, 5] and [2]: one answer token each
    got = block_conditional_log_likelihood(Recorder(), prompt, answer, block_size=2, mask_token_id=MASK,
                                           generator=torch.Generator().manual_seed(1), n_samples=64)
    assert len(seen) == 1 and seen[0][1] == {"paired": True, "block_size": 2}
    assert seen[0][0].tolist() == [[3, MASK, MASK, 3, 5, 2]]  # cat(x_t, x_0)
    mean, var = exact_blocks(model, prompt, answer, 2)
    assert var == 0 and got == pytest.approx(mean, rel=1e-5)
    seen.clear()
    block_conditional_log_likelihood(Recorder(), [3, 4, 6], [5, 2, 6, 1], block_size=2,
                                     mask_token_id=MASK, generator=torch.Generator().manual_seed(2),
                                     n_samples=16, batch_size=8)
    for x, _ in seen:
        noisy, clean = x[:, :7], x[:, 7:]
        assert (noisy[:, :3] == torch.tensor([3, 4, 6])).all()
        assert (clean == torch.tensor([3, 4, 6, 5, 2, 6, 1])).all()
        for s, e in answer_spans(3, 7, 2):  # every block masks at least one answer token
            assert ((noisy[:, s:e] == MASK).sum(1) >= 1).all()


def test_model_config_selects_the_estimator_and_bad_input_is_one_line():
    prompt, answer = [3, 4], [5, 2, 6, 1, 4]
    kw = dict(mask_token_id=MASK, n_samples=8, batch_size=4)
    blocky = tiny(3)
    assert log_likelihood_bound(blocky, prompt, answer, generator=torch.Generator().manual_seed(0), **kw) == \
        block_conditional_log_likelihood(blocky, prompt, answer, block_size=3,
                                         generator=torch.Generator().manual_seed(0), **kw)
    full = tiny(0)
    assert log_likelihood_bound(full, prompt, answer, generator=torch.Generator().manual_seed(0), **kw) == \
        conditional_log_likelihood(full, prompt, answer, generator=torch.Generator().manual_seed(0), **kw)
    with pytest.raises(LladaError, match="cfg_scale=0"):
        log_likelihood_bound(blocky, prompt, answer, generator=torch.Generator(), cfg_scale=0.5, **kw)
    with pytest.raises(LladaError, match="empty"):
        block_conditional_log_likelihood(blocky, prompt, [], block_size=3, generator=torch.Generator(), **kw)
    with pytest.raises(LladaError, match="block_size=0"):
        block_conditional_log_likelihood(blocky, prompt, answer, block_size=0, generator=torch.Generator(), **kw)


def test_perplexity_of_a_block_model_is_the_block_bound_per_window():
    model = tiny(2)
    ids = [3, 5, 4, 6, 2, 5]  # windows of 4 by 3: [0, 3) alone, then [3, 6) after token 2
    n = 2000
    cfg = PerplexityConfig(window=4, stride=3, samples=n, batch_size=50, seed=1)
    rep = corpus_elbo(model, ids, cfg, MASK)
    a, var_a = exact_blocks(model, [], ids[:3], 2)
    b, var_b = exact_blocks(model, ids[2:3], ids[3:], 2)  # blocks restart at the window start
    assert abs(rep.nll + a + b) < 4 * math.sqrt((var_a + var_b) / n), (rep.nll, -(a + b))


def test_lm_eval_core_scores_and_checks_greedy_with_blocks(tmp_path):
    from llada_train.eval.lm_eval_adapter import LLaDAHarness
    from llada_train.sample.block import block_generate
    from tests.test_sample_block import block_model_export

    block_model_export(tmp_path)
    core = LLaDAHarness(str(tmp_path / "export"), mc_num="8", mc_batch_size="4", method="block",
                        gen_length="4", seed="5")
    pairs = [("what is 3 plus", " 4 the answer is 7"), ("what is", " 2")]
    got = core.loglikelihood_pairs(pairs, progress=False)
    gen = torch.Generator().manual_seed(5)
    m = core.bundle.model
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c, r = core._split(ctx, cont)
        want = block_conditional_log_likelihood(m, c, r, block_size=4, mask_token_id=2, generator=gen,
                                                n_samples=8, batch_size=4)
        assert ll == pytest.approx(want, rel=1e-6) and ll < 0
        best = block_generate(m, torch.tensor([c]), len(r), mask_token_id=2, stop_at_eos=False)
        assert greedy == (best.generated[0, : len(r)].tolist() == r)
    texts = core.generate_texts([("what is 3 plus 4", {"until": []}), ("what", {"until": []})],
                                progress=False)
    assert len(texts) == 2
    text = "what is 3 plus 4 the answer is 7"
    (rolling,) = core.loglikelihood_rolling_texts([text], progress=False)
    rep = corpus_elbo(m, core.bundle.codec.encode(text), core.ppl_cfg, 2)  # the block bound per window
    assert rolling == pytest.approx(-rep.nll) and rolling < 0
