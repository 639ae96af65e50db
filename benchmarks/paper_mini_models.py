"""Models, the training loop and the evaluations of ``paper_mini.py``.

The loop is a plain in-process AdamW loop, not the framework's trainer: this measures the
method (objective, sampler, likelihood), and the trainer is tested elsewhere. Both twins of a
pair share config, seed, initial weights, data stream, steps and batch, so equal parameters
mean equal training FLOPs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from benchmarks.paper_mini_data import BOS, EOS, FACT_ROW, MASK, NAME_LENGTH, CharVocab
from llada_train.diffusion import ObjectiveConfig, build_objective, conditional_log_likelihood
from llada_train.model import LLaDAModel, ModelConfig
from llada_train.sample import ar_generate, ar_log_likelihood, fast_generate, generate, med_generate
from llada_train.sample.generate import commit_step
from llada_train.train.metrics import flops_per_token

SIZES = {  # name -> (d_model, n_layers, n_heads, mlp_hidden): small enough for 2 busy CPU cores
    "S": (48, 2, 4, 128),
    "M": (96, 3, 4, 256),
}
KINDS = ("diffusion", "ar")
OBJECTIVE_OF_KIND = {"diffusion": "pretrain", "ar": "ar", "block": "block"}  # registry names


def model_config(
    size: str, vocab: CharVocab, seq: int, kind: str, block_size: int = 0
) -> ModelConfig:
    """The twin of ``kind``: identical shape, causal attention for the AR one; a block
    model (kind "block") records its ``block_size`` (its samplers and bound read it)."""
    d, n_layers, n_heads, mlp = SIZES[size]
    return ModelConfig(
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        mlp_hidden_size=mlp,
        vocab_size=vocab.size,
        max_sequence_length=seq,
        mask_token_id=MASK,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=BOS,
        causal=kind == "ar",
        block_size=block_size if kind == "block" else 0,
    )


def train_flops(cfg: ModelConfig, steps: int, batch: int, seq: int) -> float:
    """Training FLOPs of a run (``flops_per_token`` convention, the same for both twins). A
    block model's pass is ``cat(x_t, x_0)``, 2 x seq positions, counted with dense attention
    over all of them (the block mask skips about 3/4 of the scores, the FLOP count does not)."""
    positions = 2 * seq if cfg.block_size else seq
    return flops_per_token(replace(cfg, causal=False), positions) * steps * batch * positions


def train(
    cfg: ModelConfig,
    kind: str,
    batches: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    seed: int,
    lr: float,
    var_len_prob: float = 0.01,
) -> tuple[LLaDAModel, float, float]:
    """AdamW, 5% linear warmup then cosine to 10%. Returns (model, last-10% mean loss, seconds).

    The diffusion twin uses the SPEC §2 objective, the AR twin next-token CE, a block model
    (kind "block") ``objective=block`` with ``cfg.block_size``; the same seed gives all the
    same initial weights and the same batches.
    """
    torch.manual_seed(seed)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    objective_cfg = ObjectiveConfig(
        name=OBJECTIVE_OF_KIND[kind],
        var_len_prob=var_len_prob,
        loss_chunk_rows=0,
        block_size=cfg.block_size if kind == "block" else 0,
    )
    objective = build_objective(objective_cfg, MASK, EOS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        ),
    )
    data_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator().manual_seed(seed + 2)
    tail: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        out = objective(model, {"input_ids": batches(data_gen)}, noise_gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(float(out.loss.detach()))
    model.eval()
    return model, sum(tail) / len(tail), time.perf_counter() - t0


# --------------------------------------------------------------------------- likelihood


def bits_per_char(
    model: LLaDAModel, kind: str, windows: torch.Tensor, samples: int, seed: int
) -> float:
    """Bits per character of ``windows`` (N, C), each after a BOS prompt: the AR twin's exact
    NLL, or the diffusion model's SPEC §6 bound (an upper bound on its NLL) with ``samples``
    Monte Carlo draws per window."""
    prompt = torch.full((windows.shape[0], 1), BOS)
    if kind == "ar":
        nats = -float(ar_log_likelihood(model, prompt, windows).sum())
    else:
        gen = torch.Generator().manual_seed(seed)
        nats = -sum(
            conditional_log_likelihood(
                model, [BOS], w, mask_token_id=MASK, generator=gen, n_samples=samples, batch_size=64
            )
            for w in windows
        )
    return nats / (windows.numel() * math.log(2))


# --------------------------------------------------------------------------- answering


def _prompts(queries: list[tuple[str, str]], vocab: CharVocab) -> tuple[torch.Tensor, list[str]]:
    """(B, P) prompt ids (BOS + text; every query of a phrasing has the same length) and answers."""
    lengths = {len(q) for q, _ in queries}
    if len(lengths) != 1:
        raise ValueError(f"queries differ in length: {sorted(lengths)}")
    ids = torch.tensor([[BOS, *vocab.encode(q)] for q, _ in queries], dtype=torch.long)
    return ids, [a for _, a in queries]


def answer(
    model: LLaDAModel, kind: str, method: str, queries: list[tuple[str, str]], vocab: CharVocab
) -> tuple[float, float]:
    """(accuracy, mean forward passes per query) of exact-match answers by ``method``.

    The diffusion model decodes the whole rest of the row (answer and EOS padding, SPEC §3's
    way of ending a response), the AR twin only the answer; NFE counts what each spends.

    Queries are grouped by prompt length (the two phrasings differ), each group one batch.
    ``row_nfe`` is what a query costs decoded alone; adaptive samplers differ per row.
    """
    groups: dict[int, list[tuple[str, str]]] = {}
    for q in queries:
        groups.setdefault(len(q[0]), []).append(q)
    correct, nfe = 0, 0.0
    for group in groups.values():
        prompt, answers = _prompts(group, vocab)
        n = len(answers[0])
        if kind == "ar":
            out = ar_generate(model, prompt, n)  # the answer only: later tokens cannot change it
            row_nfe = torch.full((len(group),), float(out.nfe))
        else:
            # the rest of the training row: answer then EOS padding, as the model saw rows
            out = decode(model, method, prompt, FACT_ROW - prompt.shape[1])
            row_nfe = out.row_nfe.double()
        texts = [vocab.decode(r[:n].tolist()) for r in out.generated]
        correct += sum(t == a for t, a in zip(texts, answers, strict=True))
        nfe += float(row_nfe.sum())
    return correct / len(queries), nfe / len(queries)


DIFFUSION_METHODS = {  # label -> sampler settings (one block: the answers are short)
    "low-confidence, 1 token/step": ("lowconf", 1),
    "low-confidence, 2 tokens/step": ("lowconf", 2),
    "MED (lambda=0.2)": ("med", 0.2),
    "threshold (tau=0.9)": ("threshold", 0.9),
}


def decode(model: LLaDAModel, method: str, prompt: torch.Tensor, gen_length: int):
    """Run the diffusion sampler named in ``DIFFUSION_METHODS`` (greedy, temperature 0)."""
    name, arg = DIFFUSION_METHODS[method]
    if name == "lowconf":
        steps = -(-gen_length // int(arg))
        return generate(model, prompt, gen_length, steps, mask_token_id=MASK)
    if name == "med":
        return med_generate(model, prompt, gen_length, mask_token_id=MASK, entropy_threshold=arg)
    return fast_generate(model, prompt, gen_length, gen_length, mask_token_id=MASK, threshold=arg)


@torch.no_grad()
def infill_accuracy(model: LLaDAModel, facts: list, vocab: CharVocab) -> float:
    """Diffusion only: the held-out name recovered by infilling the *trained* sentence with the
    first name masked (e.g. "the parent of ___ is B."), one low-confidence commit per step."""
    rows, targets = [], []
    for f in facts:
        if f.seen == "both":
            continue
        s = f.sentence(f.seen)
        start = s.index(" of ") + 4
        ids = [BOS, *vocab.encode(s)]
        ids += [EOS] * (FACT_ROW - len(ids))  # as in training: the two phrasings differ in length
        targets.append(ids[1 + start : 1 + start + NAME_LENGTH])
        ids[1 + start : 1 + start + NAME_LENGTH] = [MASK] * NAME_LENGTH
        rows.append(ids)
    x = torch.tensor(rows, dtype=torch.long)
    region = x == MASK
    one = torch.ones(x.shape[0], dtype=torch.long)
    for _ in range(NAME_LENGTH):
        x, _ = commit_step(
            x, model(x).float(), x == MASK, one, 0.0, "low_confidence", None, mask_token_id=MASK
        )
    got = x[region].view(len(rows), NAME_LENGTH)
    want = torch.tensor(targets, dtype=torch.long)
    return float((got == want).all(1).double().mean())


# --------------------------------------------------------------------------- reporting


def ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of mean +- 1.96 std/sqrt(n)); half-width 0 for one value."""
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, half


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def fmt(values: list[float]) -> str:
    mean, half = ci95(values)
    return f"{100 * mean:.1f} +- {100 * half:.1f}"
