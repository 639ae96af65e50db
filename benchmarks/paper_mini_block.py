"""Part 2 of ``paper_mini.py`` (issue 21 item 7): block diffusion in the miniature.

4. Likelihood ladder at equal steps and tokens: the AR twin, block diffusion with blocks of
   1, 4, 8 and 16 (``objective=block``) and full diffusion (MDLM, ``objective=pretrain``),
   one seed, the same initial weights and batches, at two step budgets. Each diffusion
   model's bound is the block NELBO of ``likelihood_block`` (one block for MDLM), drawn in
   ``repeats`` independent estimates of ``samples`` draws each: the mean is the figure, the
   spread across repeats the estimator's variance at that sample budget.
5. Reversal in the paper's own form (LLaDA Table 4, poem completion): two-line poems; given
   one line, the next (forward) or the previous (reversal) line, for the diffusion model, a
   block model and the AR twin, on poems seen only as the couplet in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.paper_mini_data import (
    BOS,
    EOS,
    LINE_LENGTH,
    MASK,
    POEM_ROW,
    CharVocab,
    couplet_infill_rows,
    load_shakespeare,
    make_poems,
    poem_queries,
    poem_rows,
    random_windows,
    split_ids,
    test_windows,
)
from benchmarks.paper_mini_models import ci95, fmt, model_config, table, train, train_flops
from llada_train.diffusion.likelihood_block import block_conditional_log_likelihood
from llada_train.model import LLaDAModel
from llada_train.sample import ar_generate, ar_log_likelihood, block_generate, generate
from llada_train.sample.generate import commit_step

# label -> (kind, block size); MDLM is full diffusion, BD(1) is BD3-LM's AR limit (§3)
LADDER = {
    "AR": ("ar", 0),
    "BD(1)": ("block", 1),
    "BD(4)": ("block", 4),
    "BD(8)": ("block", 8),
    "BD(16)": ("block", 16),
    "MDLM": ("diffusion", 0),
}


@dataclass
class BlockPlan:
    """How much of part 2 a mode runs."""

    budgets: tuple[int, ...]  # training steps of each ladder run (every model at each)
    lm_batch: int
    lm_seq: int
    test_windows: int
    samples: int  # Monte Carlo draws per estimate
    repeats: int  # independent estimates per window (their spread is the variance)
    poems_per_group: int
    poem_steps: int
    poem_batch: int
    poem_block: int
    seeds: tuple[int, ...]


LR = 3e-3


QUICK2 = BlockPlan((40,), 8, 64, 4, 4, 3, 4, 60, 16, 4, (0, 1))
# ~45 min on 2 busy cores: 6 models x (1000 + 4000) steps, then 3 models x 3 seeds x 3000 steps
# (the diffusion model memorises the poems slowly: 1500 steps gave it 25% of the couplets)
FULL2 = BlockPlan((1000, 4000), 16, 64, 32, 16, 8, 8, 3000, 32, 4, (0, 1, 2))


# --------------------------------------------------------------------------- experiment 4


def nelbo_draws(
    model: LLaDAModel, kind: str, block: int, windows: torch.Tensor, plan: BlockPlan, seed: int
) -> torch.Tensor:
    """(N, repeats) estimates of log p(window | BOS) in nats: exact for the AR twin (one
    column), else the block bound with ``plan.samples`` draws each (MDLM: one block)."""
    prompt = torch.full((windows.shape[0], 1), BOS)
    if kind == "ar":
        return ar_log_likelihood(model, prompt, windows).double()[:, None]
    size = block or windows.shape[1] + 1  # one block over BOS and the window: SPEC §6
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(windows.shape[0], plan.repeats, dtype=torch.float64)
    for i, w in enumerate(windows):
        for r in range(plan.repeats):
            out[i, r] = block_conditional_log_likelihood(
                model,
                [BOS],
                w,
                block_size=size,
                mask_token_id=MASK,
                generator=gen,
                n_samples=plan.samples,
                batch_size=plan.samples,
            )
    return out


def ladder(plan: BlockPlan, data: Path, seed: int) -> dict:
    """Every ``LADDER`` model at every budget: bits/char, the std of one estimate, FLOPs."""
    text, vocab = load_shakespeare(data)
    train_ids, test_ids = split_ids(text, vocab)
    windows = test_windows(test_ids, plan.test_windows, plan.lm_seq)  # (N, C)
    per_char = windows.shape[1] * math.log(2)  # nats of a window -> bits/char
    rows = []
    for label, (kind, block) in LADDER.items():
        cfg = model_config("S", vocab, plan.lm_seq, kind, block)
        row: dict = {"model": label, "block": block, "runs": {}}
        for steps in plan.budgets:
            model, loss, sec = train(
                cfg,
                kind,
                lambda g: random_windows(train_ids, plan.lm_batch, plan.lm_seq, g),
                steps,
                seed,
                LR,
            )
            est = nelbo_draws(model, kind, block, windows, plan, seed)  # (N, R)
            var = est.var(dim=1).mean() if est.shape[1] > 1 else torch.zeros(())
            row["runs"][steps] = {
                "bits_per_char": float(-est.mean()) / per_char,
                "estimate_std": float(var.sqrt()) / per_char,  # one estimate of one window
                "loss": loss,
                "seconds": sec,
                "flops": train_flops(cfg, steps, plan.lm_batch, plan.lm_seq),
            }
            r = row["runs"][steps]
            print(
                f"  [ladder] {label} {steps} steps: loss {loss:.3f}, {r['bits_per_char']:.3f} "
                f"bits/char (std {r['estimate_std']:.4f}), {sec:.0f}s",
                flush=True,
            )
        rows.append(row)
    return {"test_chars": int(windows.numel()), "seed": seed, "rows": rows}


def ordering(res: dict, steps: int) -> str:
    """Which of BD3-LM's inequalities AR < BD(4) < BD(8) < BD(16) < MDLM hold at ``steps``."""
    bpc = {r["model"]: r["runs"][steps]["bits_per_char"] for r in res["rows"]}
    chain = ["AR", "BD(4)", "BD(8)", "BD(16)", "MDLM"]
    return " ".join(
        f"{a} {'<' if bpc[a] < bpc[b] else '>'} {b}"
        if i == 0
        else f"{'<' if bpc[a] < bpc[b] else '>'} {b}"
        for i, (a, b) in enumerate(zip(chain, chain[1:], strict=False))
    )


def ladder_table(res: dict, plan: BlockPlan) -> str:
    last = plan.budgets[-1]
    header = ["model", "objective", f"train FLOPs @ {last} steps"]
    header += [f"bits/char @ {s} steps" for s in plan.budgets]
    header += [f"std of one {plan.samples}-draw estimate @ {last} (bits/char)"]
    rows = []
    for r in res["rows"]:
        kind, block = LADDER[r["model"]]
        objective = {"ar": "next-token CE", "diffusion": "SPEC §2 (1 x L)"}.get(
            kind, f"block, b={block} (2 x L)"
        )
        rows.append(
            [r["model"], objective, f"{r['runs'][last]['flops']:.2e}"]
            + [f"{r['runs'][s]['bits_per_char']:.3f}" for s in plan.budgets]
            + [f"{r['runs'][last]['estimate_std']:.4f}"]
        )
    return table(header, rows)


# --------------------------------------------------------------------------- experiment 5

POEM_MODELS = ("diffusion", "block", "ar")


def complete(
    model: LLaDAModel, kind: str, queries: list[tuple[str, str]], vocab: CharVocab
) -> float:
    """Exact-match accuracy of the line generated after each prompt (greedy): the AR twin
    decodes the line, the diffusion model the rest of the row one token per step (low
    confidence), the block model block by block (one token per step)."""
    ids = torch.tensor([[BOS, *vocab.encode(q)] for q, _ in queries], dtype=torch.long)  # (B, P)
    P = ids.shape[1]
    if kind == "ar":
        gen = ar_generate(model, ids, LINE_LENGTH).generated
    elif kind == "diffusion":
        gen = generate(model, ids, POEM_ROW - P, POEM_ROW - P, mask_token_id=MASK).generated
    else:
        b = model.config.block_size
        gen = block_generate(
            model, ids, (POEM_ROW - P) // b * b, mask_token_id=MASK, eos_token_id=EOS
        ).generated
    texts = [vocab.decode(r[:LINE_LENGTH].tolist()) for r in gen]
    return sum(t == a for t, (_, a) in zip(texts, queries, strict=True)) / len(queries)


@torch.no_grad()
def infill(model: LLaDAModel, rows: torch.Tensor, answers: list[str], vocab: CharVocab) -> float:
    """Exact-match accuracy of the masked first lines of ``rows`` (B, POEM_ROW), one
    low-confidence commit per step with the model's own attention (block-causal for a
    block model, so its first line cannot see the second)."""
    x = rows.clone()
    region = x == MASK  # (B, L)
    one = torch.ones(x.shape[0], dtype=torch.long)
    for _ in range(LINE_LENGTH):
        x, _ = commit_step(
            x, model(x).float(), x == MASK, one, 0.0, "low_confidence", None, mask_token_id=MASK
        )
    got = [vocab.decode(r.tolist()) for r in x[region].view(len(answers), LINE_LENGTH)]
    return sum(g == a for g, a in zip(got, answers, strict=True)) / len(answers)


def poems(plan: BlockPlan, data: Path, seeds: list[int]) -> dict:
    """Per seed: new poems; the three models; prompted next/previous and couplet queries."""
    _, vocab = load_shakespeare(data)
    per_seed = []
    for seed in seeds:
        book = make_poems(plan.poems_per_group, seed)
        rows = poem_rows(book, vocab)
        res: dict = {"seed": seed, "train_rows": len(rows)}
        for kind in POEM_MODELS:
            cfg = model_config("S", vocab, POEM_ROW, kind, plan.poem_block)
            model, loss, sec = train(
                cfg,
                kind,
                lambda g, rows=rows: rows[
                    torch.randint(0, len(rows), (plan.poem_batch,), generator=g)
                ],
                plan.poem_steps,
                seed,
                LR,
                var_len_prob=0.0,  # a cut would drop the second line
            )
            cells = {
                form: complete(model, kind, poem_queries(book, form), vocab)
                for form in ("next", "previous", "couplet")
            }
            # the AR twin cannot condition on a right context: no infill query for it
            cells["couplet_infill"] = (
                None if kind == "ar" else infill(model, *couplet_infill_rows(book, vocab), vocab)
            )
            res[kind] = {**cells, "loss": loss, "seconds": sec}
            print(
                f"  [poems] seed {seed} {kind}: loss {loss:.3f}, "
                + ", ".join(f"{k} {v:.2f}" for k, v in cells.items() if v is not None)
                + f", {sec:.0f}s",
                flush=True,
            )
        per_seed.append(res)
    cfg = model_config("S", vocab, POEM_ROW, "ar")
    return {
        "poems": len(book),
        "queries": plan.poems_per_group,
        "seeds": seeds,
        "per_seed": per_seed,
        "flops": train_flops(cfg, plan.poem_steps, plan.poem_batch, POEM_ROW),
        "block_flops": train_flops(
            model_config("S", vocab, POEM_ROW, "block", plan.poem_block),
            plan.poem_steps,
            plan.poem_batch,
            POEM_ROW,
        ),
    }


def poem_table(res: dict, plan: BlockPlan, phrasing: dict | None) -> str:
    """Rows: the prompted (paper) form, the couplet form and, when part 1 ran, its phrasing
    test; columns: forward and reversal accuracy of each model (mean +- 95% CI)."""
    ps = res["per_seed"]

    def cell(kind: str, key: str, source: list[dict]) -> str:
        vals = [r[kind][key] for r in source]
        return "n/a" if vals[0] is None else fmt(vals)

    names = {"diffusion": "diffusion", "block": f"block({plan.poem_block})", "ar": "AR"}
    header = ["test"] + [
        f"{names[k]} {d}" for k in POEM_MODELS for d in ("forward %", "reversal %")
    ]
    rows = [
        ["poem, prompted: 'line >' next / 'line <' previous (Table 4's form)"]
        + [cell(k, key, ps) for k in POEM_MODELS for key in ("next", "previous")],
        ["poem as written: complete 'line1 / ' / infill line1 before ' / line2.'"]
        + [cell(k, key, ps) for k in POEM_MODELS for key in ("couplet", "couplet_infill")],
    ]
    if phrasing is not None:  # part 1's test: a fact queried in another phrasing
        pp = phrasing["per_seed"]
        rows.append(
            ["fact in another phrasing (part 1; not a claim of the paper)"]
            + [
                cell("diffusion", "forward", pp),
                cell("diffusion", "reversed", pp),
                "n/a",
                "n/a",
                cell("ar", "forward", pp),
                cell("ar", "reversed", pp),
            ]
        )
    return table(header, rows)


# --------------------------------------------------------------------------- plots


def plots(lad: dict, rev: dict, plan: BlockPlan, out: Path) -> list[Path]:
    """block_likelihood.png (the ladder at each budget) and poems.png (forward/reversal)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    paths = [out / "block_likelihood.png", out / "poems.png"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    labels = [r["model"] for r in lad["rows"]]
    for steps in plan.budgets:
        ax.errorbar(
            range(len(labels)),
            [r["runs"][steps]["bits_per_char"] for r in lad["rows"]],
            yerr=[r["runs"][steps]["estimate_std"] for r in lad["rows"]],
            fmt="o-",
            capsize=3,
            label=f"{steps} steps",
        )
    ax.set_xticks(range(len(labels)), labels)
    ax.set(
        ylabel="held-out bits/char (bound; AR exact)",
        title=f"Ladder at equal steps (bars: std of a {plan.samples}-draw bound)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ps = rev["per_seed"]
    keys = [
        ("next", "prompted fwd"),
        ("previous", "prompted rev"),
        ("couplet", "couplet fwd"),
        ("couplet_infill", "couplet rev"),
    ]
    width = 0.25
    for i, kind in enumerate(POEM_MODELS):
        stats = [
            ci95([r[kind][k] for r in ps]) if ps[0][kind][k] is not None else (0.0, 0.0)
            for k, _ in keys
        ]
        ax.bar(
            [j + (i - 1) * width for j in range(len(keys))],
            [100 * s[0] for s in stats],
            width,
            yerr=[100 * s[1] for s in stats],
            capsize=3,
            label=kind,
        )
    ax.set_xticks(range(len(keys)), [name for _, name in keys])
    ax.set(
        ylabel="exact line % (95% CI)", title=f"Poem completion ({len(ps)} seeds; AR has no infill)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close("all")
    return paths


def part_two_text(lad: dict, rev: dict, plan: BlockPlan, phrasing: dict | None) -> list[str]:
    """The headings and tables of experiments 4 and 5."""
    last = plan.budgets[-1]
    return [
        f"## 4. Likelihood ladder at equal steps and tokens (seed {lad['seed']}; size S; "
        f"{' and '.join(map(str, plan.budgets))} steps x {plan.lm_batch} x {plan.lm_seq} tokens "
        f"per model; {lad['test_chars']} held-out chars; each bound {plan.repeats} estimates x "
        f"{plan.samples} draws per window; block models run cat(x_t, x_0), 2 x the positions)",
        ladder_table(lad, plan),
        "ordering at "
        + ", ".join(f"{s} steps: {ordering(lad, s)}" for s in plan.budgets)
        + f" (BD3-LM, LM1B: AR < BD(4) < BD(8) < BD(16) < MDLM); FLOPs at {last} steps as above",
        f"## 5. Reversal in the paper's own form: poem completion ({rev['poems']} poems per seed, "
        f"{rev['queries']} held-out queries per cell and seed, seeds "
        f"{' '.join(map(str, rev['seeds']))}; {plan.poem_steps} steps x {plan.poem_batch} rows of "
        f"{POEM_ROW}; {rev['flops']:.2e} train FLOPs (diffusion, AR), {rev['block_flops']:.2e} "
        f"(block); mean +- 1.96 std/sqrt(n))",
        poem_table(rev, plan, phrasing),
    ]
