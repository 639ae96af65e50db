"""Perplexity by the ELBO: window coverage, the Monte Carlo estimate against the exact finite
sum over every mask count and pattern, the CLI and lm-eval's ``loglikelihood_rolling``."""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest
import torch

from llada_train.diffusion.likelihood import conditional_log_likelihood
from llada_train.errors import LladaError
from llada_train.eval.perplexity import PerplexityConfig, corpus_elbo, read_corpus, rolling_windows
from llada_train.model import LLaDAModel, ModelConfig
from tests.test_eval_cli import model_dir, run_cli  # noqa: F401  (module fixture: tiny model)

V, MASK = 12, 2


@pytest.mark.parametrize("n,window,stride", [(1, 4, 4), (10, 4, 3), (17, 8, 8), (17, 8, 1),
                                             (100, 16, 5), (5, 32, 7)])
def test_windows_score_every_token_exactly_once(n, window, stride):
    spans = rolling_windows(n, window, stride)
    scored = [i for _, a, b in spans for i in range(a, b)]
    assert scored == list(range(n))  # each index once, in order
    for ctx, a, b in spans:
        assert 0 < b - a <= stride and b - ctx == min(window, b)  # the longest context that fits


def test_stride_past_the_window_is_refused():
    with pytest.raises(LladaError, match="stride"):
        rolling_windows(10, 4, 5)


def tiny_model() -> LLaDAModel:
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=32,
                      vocab_size=V, mask_token_id=MASK, init_std=0.5)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(3))
    return model.eval()


@torch.no_grad()
def exact_terms(model, prompt: list[int], answer: list[int]) -> list[tuple[float, float]]:
    """(probability, value) of every (l, subset) draw of the SPEC §6 estimator:
    l ~ U{1..n}, then a uniform subset of l answer positions; value (n / l) sum log p."""
    n, P = len(answer), len(prompt)
    out = []
    for count in range(1, n + 1):
        for subset in combinations(range(n), count):
            noisy = list(answer)
            for i in subset:
                noisy[i] = MASK
            logp = torch.log_softmax(model(torch.tensor([prompt + noisy]))[0, P:].double(), -1)
            value = n / count * sum(float(logp[i, answer[i]]) for i in subset)
            out.append((1.0 / n / math.comb(n, count), value))
    return out


def mean_var(terms):
    mean = sum(p * v for p, v in terms)
    return mean, sum(p * (v - mean) ** 2 for p, v in terms)


def test_monte_carlo_bound_matches_the_exact_enumeration():
    model = tiny_model()
    prompt, answer = [5, 7], [3, 9, 4, 11]  # L = 4: 15 (l, subset) patterns
    exact, var = mean_var(exact_terms(model, prompt, answer))
    n = 4000
    est = conditional_log_likelihood(model, prompt, answer, mask_token_id=MASK,
                                     generator=torch.Generator().manual_seed(0),
                                     n_samples=n, batch_size=4)
    # stratified l only lowers the variance: the iid bound on the error is conservative
    assert abs(est - exact) < 5 * math.sqrt(var / n), (est, exact, math.sqrt(var / n))


def test_corpus_elbo_matches_the_exact_sum_over_windows():
    model = tiny_model()
    ids = [3, 9, 4, 11, 6, 8]  # windows of 4 by 3: [0, 3) alone, then [3, 6) after token 2
    exact_a, var_a = mean_var(exact_terms(model, [], ids[:3]))
    exact_b, var_b = mean_var(exact_terms(model, ids[2:3], ids[3:]))
    n = 3000
    cfg = PerplexityConfig(window=4, stride=3, samples=n, batch_size=3, seed=1)
    rep = corpus_elbo(model, ids, cfg, MASK)
    assert rep.windows == 2 and rep.tokens == 6
    se = math.sqrt((var_a + var_b) / n)
    assert abs(rep.nll - (-(exact_a + exact_b))) < 5 * se, (rep.nll, -(exact_a + exact_b), se)
    assert rep.bits_per_token == pytest.approx(rep.nll / 6 / math.log(2))
    assert rep.perplexity == pytest.approx(math.exp(rep.nll / 6))
    assert corpus_elbo(model, ids, cfg, MASK).nll == rep.nll  # seeded: the same every time


def test_jsonl_documents_are_joined_with_eos(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert read_corpus(path, lambda t: [ord(ch) for ch in t], eos_token_id=1) == [97, 98, 1, 99, 1]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LladaError, match="bad.jsonl:1 has no 'text' field"):
        read_corpus(tmp_path / "bad.jsonl", list, 1)


def test_eval_cli_reports_perplexity(model_dir, tmp_path):  # noqa: F811
    corpus = tmp_path / "heldout.txt"
    corpus.write_text("what is 3 plus 4 the answer is 7 " * 3)
    out = tmp_path / "ppl.json"
    res = run_cli("llada_train.cli.eval", "task=ppl", f"model_path={model_dir}",
                  f"data_path={corpus}", "ppl.window=8", "ppl.stride=4", "ppl.samples=8",
                  f"output={out}", "progress=false", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    summary = json.loads(out.read_text())
    assert summary["tokens"] == 27 and summary["windows"] == 7  # 9 words x 3, 4 per window
    assert "task=ppl perplexity=" in res.stdout
    assert summary["bits_per_token"] == pytest.approx(math.log2(summary["perplexity"]))


def test_lm_eval_rolling_uses_the_windowed_bound(model_dir):  # noqa: F811
    from llada_train.eval.lm_eval_adapter import LLaDAHarness

    h = LLaDAHarness(str(model_dir), mc_num=8, mc_batch_size=8, ppl_window=8, ppl_stride=4)
    text = "what is 3 plus 4 the answer is 7"
    (ll,) = h.loglikelihood_rolling_texts([text], progress=False)
    ids = h.bundle.codec.encode(text)
    rep = corpus_elbo(h.bundle.model, ids, h.ppl_cfg, h.bundle.mask_token_id)
    assert ll == pytest.approx(-rep.nll) and ll < 0
