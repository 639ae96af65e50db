"""Perplexity of a masked-diffusion model: the ELBO bound over a corpus, in sliding windows.

The corpus is one token stream (a .txt file whole; a .jsonl file's texts joined with EOS,
as in pre-training). Windows of at most ``window`` tokens advance by ``stride``: each scores
the tokens after the previous window's end, conditioned on the window's earlier tokens
(never masked), so every token is scored exactly once and

    log p(corpus) ~ sum_windows log p(scored | context) >= sum_windows ELBO(scored | context)

with each ELBO the SPEC §6 bound (``conditional_log_likelihood``), or for a block model
(``config.block_size`` > 0) the block NELBO with blocks from each window's first token
(``block_conditional_log_likelihood``, as training windows are cut). The reported perplexity
``exp(-ELBO / N)`` is therefore an upper bound on the model's perplexity (up to Monte Carlo
noise and the truncated context, as with any sliding-window perplexity).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llada_train.diffusion.likelihood_block import log_likelihood_bound
from llada_train.errors import LladaError


@dataclass
class PerplexityConfig:
    """``llada-eval task=ppl`` settings (the ``ppl`` group of ``conf/eval.yaml``)."""

    window: int = 256  # tokens per window: context + scored
    stride: int = 128  # scored tokens per window (<= window)
    samples: int = 32  # Monte Carlo masks per window (stratified mask counts)
    batch_size: int = 16  # masked copies per forward call
    seed: int = 0
    text_field: str = "text"  # jsonl: the field holding each document


@dataclass
class PerplexityReport:
    """Negative ELBO over the corpus and what follows from it."""

    nll: float  # nats, summed over the scored tokens (an upper bound on -log p)
    tokens: int
    windows: int

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def bits_per_token(self) -> float:
        return self.nats_per_token / math.log(2.0)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)


def rolling_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(context start, scored start, scored end) per window; the scored spans tile [0, n)."""
    if not 1 <= stride <= window:
        raise LladaError(f"ppl.stride={stride}, ppl.window={window}: use 1 <= stride <= window")
    out, prev = [], 0
    while prev < n:
        end = min(prev + stride, n)
        out.append((max(0, end - window), prev, end))
        prev = end
    return out


def read_corpus(path: str | Path, encode, eos_token_id: int, text_field: str = "text") -> list[int]:
    """Token ids of a .txt file (whole) or a .jsonl file (documents joined by EOS)."""
    p = Path(path)
    if not p.is_file():
        raise LladaError(f"data_path={p} not found: pass a .txt or .jsonl corpus")
    if p.suffix == ".jsonl":
        ids: list[int] = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LladaError(
                    f"{p}:{n} has no {text_field!r} field: set ppl.text_field or fix the line"
                ) from None
            ids += [*encode(text), eos_token_id]
    else:
        ids = list(encode(p.read_text()))
    if not ids:
        raise LladaError(f"{p} holds no tokens: nothing to score")
    return ids


def corpus_elbo(
    model: torch.nn.Module,
    ids: list[int],
    cfg: PerplexityConfig,
    mask_token_id: int,
    progress: bool = False,
) -> PerplexityReport:
    """The negative ELBO of ``ids`` in sliding windows (each token scored once)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    seq = torch.as_tensor(ids, dtype=torch.long)
    spans = rolling_windows(len(ids), cfg.window, cfg.stride)
    nll = 0.0
    for ctx, start, end in tqdm(spans, desc="ppl", disable=not progress):
        nll -= log_likelihood_bound(
            model, seq[ctx:start], seq[start:end], mask_token_id=mask_token_id,
            generator=gen, n_samples=cfg.samples, batch_size=cfg.batch_size,
        )
    return PerplexityReport(nll, len(ids), len(spans))
