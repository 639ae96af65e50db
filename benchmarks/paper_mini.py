"""The LLaDA paper's comparisons with an autoregressive twin, in miniature (issue 15).

Each diffusion model has an AR twin: the same config with ``causal=True``, the same seed
(hence the same initial weights), the same batches, steps and sequence length, so equal
parameter counts mean equal training FLOPs. Training is a plain in-process AdamW loop, not
the framework's trainer: this benchmarks the method (objectives, samplers, likelihood).

1. Likelihood at equal compute: twins of 2 sizes on tinyshakespeare (characters; the last
   10% held out); the diffusion model's SPEC §6 bound vs the AR twin's exact NLL, bits/char.
2. Reversal curse: synthetic facts "the parent of A is B", each one-phrasing fact seen only
   in its phrasing; queries in the seen and the other phrasing, over several seeds.
3. Sampling speed vs quality on the reversal models: completions " is B." of seen-phrasing
   prompts by several diffusion samplers and AR greedy decoding; accuracy and NFE.

Part 2 (issue 21, ``paper_mini_block.py``): 4. the likelihood ladder AR, BD(1), BD(4), BD(8),
BD(16), MDLM at equal steps and tokens, with each bound's estimator spread; 5. reversal in the
LLaDA paper's own form (Table 4: two-line poems, the next or the previous line) for the
diffusion model, a block model and the AR twin, beside part 1's phrasing test.

    python benchmarks/paper_mini.py --quick --out /tmp/pm   # smoke run of both parts, ~1 min
    python benchmarks/paper_mini.py --out runs/paper_mini   # full run (--part 1 or 2: one part)

Prints Markdown tables and writes ``tables.md``, ``results.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.paper_mini_block import (  # noqa: E402
    FULL2,
    QUICK2,
    ladder,
    part_two_text,
    poems,
)
from benchmarks.paper_mini_block import plots as block_plots  # noqa: E402
from benchmarks.paper_mini_data import (  # noqa: E402
    FACT_ROW,
    NAME_LENGTH,
    fact_rows,
    held_out_queries,
    load_shakespeare,
    make_facts,
    random_windows,
    split_ids,
    test_windows,
)
from benchmarks.paper_mini_models import (  # noqa: E402
    DIFFUSION_METHODS,
    KINDS,
    SIZES,
    answer,
    bits_per_char,
    ci95,
    fmt,
    infill_accuracy,
    model_config,
    table,
    train,
    train_flops,
)
from llada_train.model.transformer import count_parameters  # noqa: E402


@dataclass
class Plan:
    """How much of everything a mode runs."""

    lm_steps: int
    lm_batch: int
    lm_seq: int
    test_windows: int
    elbo_samples: int
    facts_per_group: int
    fact_steps: int
    fact_batch: int
    fact_size: str
    seeds: tuple[int, ...]


# the diffusion model memorises far more slowly than its AR twin: the full mode's 30 facts and
# 2000 steps let it reach ~95% on the seen phrasing (90 facts did not within 2000 steps)
QUICK = Plan(60, 16, 64, 8, 16, 10, 150, 32, "S", (0, 1, 2))
FULL = Plan(1500, 16, 64, 32, 128, 10, 2000, 32, "S", (0, 1, 2, 3, 4))
LR = 3e-3


# --------------------------------------------------------------------------- experiment 1


def likelihood(plan: Plan, data: Path, seed: int) -> dict:
    """Twins of every size on tinyshakespeare; bits/char of the held-out windows."""
    text, vocab = load_shakespeare(data)
    train_ids, test_ids = split_ids(text, vocab)
    windows = test_windows(test_ids, plan.test_windows, plan.lm_seq)
    out = {"vocab": vocab.size, "test_chars": int(windows.numel()), "rows": []}
    for size in SIZES:
        row: dict = {"size": size}
        for kind in KINDS:
            cfg = model_config(size, vocab, plan.lm_seq, kind)
            model, loss, sec = train(
                cfg,
                kind,
                lambda g: random_windows(train_ids, plan.lm_batch, plan.lm_seq, g),
                plan.lm_steps,
                seed,
                LR,
            )
            row[kind] = bits_per_char(model, kind, windows, plan.elbo_samples, seed)
            row[f"{kind}_seconds"] = sec
            row["params"] = count_parameters(cfg)
            row["flops"] = train_flops(cfg, plan.lm_steps, plan.lm_batch, plan.lm_seq)
            print(
                f"  [lm] {size} {kind}: train loss {loss:.3f}, {row[kind]:.3f} bits/char, {sec:.0f}s",
                flush=True,
            )
        out["rows"].append(row)
    return out


def likelihood_table(res: dict) -> str:
    rows = [
        [
            r["size"],
            f"{r['params']:,}",
            f"{r['flops']:.2e}",
            f"{r['diffusion']:.3f}",
            f"{r['ar']:.3f}",
            f"{r['diffusion'] - r['ar']:+.3f}",
            f"{r['diffusion'] / r['ar']:.3f}",
        ]
        for r in res["rows"]
    ]
    return table(
        [
            "size",
            "params",
            "train FLOPs (each)",
            "diffusion bound (bits/char)",
            "AR exact (bits/char)",
            "gap",
            "ratio",
        ],
        rows,
    )


# --------------------------------------------------------------------------- experiments 2, 3

SPEED_CHARS = NAME_LENGTH + 5  # " is B." plus the full stop: 8 characters to decode


def reversal(plan: Plan, data: Path, seeds: list[int]) -> dict:
    """Per seed: new facts, diffusion and AR twins, forward/reversed accuracy, sampler sweep."""
    _, vocab = load_shakespeare(data)
    per_seed = []
    for seed in seeds:
        facts = make_facts(plan.facts_per_group, seed)
        rows = fact_rows(facts, vocab)
        fwd = held_out_queries(facts, "forward")
        rev = held_out_queries(facts, "reversed")
        speed_q = held_out_queries(facts, "forward", SPEED_CHARS)
        res: dict = {"seed": seed, "train_rows": len(rows)}
        for kind in KINDS:
            cfg = model_config(plan.fact_size, vocab, FACT_ROW, kind)
            model, loss, sec = train(
                cfg,
                kind,
                lambda g, rows=rows: rows[
                    torch.randint(0, len(rows), (plan.fact_batch,), generator=g)
                ],
                plan.fact_steps,
                seed,
                LR,
                var_len_prob=0.0,  # a cut would drop the answer
            )
            first = "low-confidence, 1 token/step"
            res[kind] = {
                "forward": answer(model, kind, first, fwd, vocab)[0],
                "reversed": answer(model, kind, first, rev, vocab)[0],
                "loss": loss,
                "seconds": sec,
            }
            if kind == "diffusion":
                res[kind]["infill"] = infill_accuracy(model, facts, vocab)
                methods = list(DIFFUSION_METHODS)
            else:
                methods = ["AR greedy"]
            res[kind]["speed"] = {m: answer(model, kind, m, speed_q, vocab) for m in methods}
            print(
                f"  [facts] seed {seed} {kind}: loss {loss:.3f}, forward {res[kind]['forward']:.2f}, "
                f"reversed {res[kind]['reversed']:.2f}, {sec:.0f}s",
                flush=True,
            )
        per_seed.append(res)
    return {
        "facts": len(facts),
        "queries": len(fwd),
        "seeds": seeds,
        "per_seed": per_seed,
        "params": count_parameters(model_config(plan.fact_size, vocab, FACT_ROW, "ar")),
        "flops": train_flops(
            model_config(plan.fact_size, vocab, FACT_ROW, "ar"),
            plan.fact_steps,
            plan.fact_batch,
            FACT_ROW,
        ),
    }


def reversal_table(res: dict) -> str:
    ps = res["per_seed"]
    rows = []
    for kind in KINDS:
        f = [r[kind]["forward"] for r in ps]
        v = [r[kind]["reversed"] for r in ps]
        gap = [a - b for a, b in zip(f, v, strict=True)]
        infill = fmt([r[kind]["infill"] for r in ps]) if kind == "diffusion" else "n/a"
        rows.append([kind, fmt(f), fmt(v), fmt(gap), infill])
    return table(
        [
            "model",
            "forward (seen phrasing) %",
            "reversed (other phrasing) %",
            "forward - reversed",
            "infill reversed name %",
        ],
        rows,
    )


def speed_rows(res: dict) -> list[tuple[str, float, float, float]]:
    """(method, mean accuracy, CI half-width, mean NFE per query) over seeds."""
    ps = res["per_seed"]
    out = []
    for kind in KINDS:
        for m in ps[0][kind]["speed"]:
            acc, half = ci95([r[kind]["speed"][m][0] for r in ps])
            out.append((m, acc, half, statistics.fmean(r[kind]["speed"][m][1] for r in ps)))
    return out


def speed_table(res: dict) -> str:
    rows = [[m, f"{100 * a:.1f} +- {100 * h:.1f}", f"{n:.2f}"] for m, a, h, n in speed_rows(res)]
    return table(["method", f"exact {SPEED_CHARS}-char completion %", "NFE per query"], rows)


# --------------------------------------------------------------------------- plots


def plots(lm: dict, rev: dict, out: Path) -> list[Path]:
    """likelihood.png, reversal.png, speed.png."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    paths = [out / "likelihood.png", out / "reversal.png", out / "speed.png"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    params = [r["params"] for r in lm["rows"]]
    for kind, label in (("diffusion", "diffusion (SPEC §6 bound)"), ("ar", "AR (exact)")):
        ax.plot(params, [r[kind] for r in lm["rows"]], "o-", label=label)
    ax.set(
        xscale="log",
        xlabel="parameters (equal training FLOPs per pair)",
        ylabel="held-out bits/char",
        title="Likelihood at equal compute",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ps = rev["per_seed"]
    for start, kind, cells in (
        (0, "diffusion", ("forward", "reversed", "infill")),
        (4, "ar", ("forward", "reversed")),
    ):
        stats = [ci95([r[kind][d] for r in ps]) for d in cells]
        ax.bar(
            range(start, start + len(cells)),
            [100 * s[0] for s in stats],
            yerr=[100 * s[1] for s in stats],
            color=["tab:blue", "tab:orange", "tab:green"][: len(cells)],
            capsize=4,
        )
    ax.set_xticks([0, 1, 2, 4, 5], ["diff fwd", "diff rev", "diff infill", "AR fwd", "AR rev"])
    ax.set(
        ylabel="accuracy % (95% CI)",
        title=f"Reversal curse ({rev['facts']} facts, {len(ps)} seeds)",
    )
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, acc, half, nfe in speed_rows(rev):
        ax.errorbar(nfe, 100 * acc, yerr=100 * half, fmt="o", capsize=3, label=m)
    ax.set(xlabel="forward passes per query", ylabel="exact completion %", title="Speed vs quality")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close("all")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 min)")
    parser.add_argument(
        "--part",
        choices=("1", "2", "all"),
        default="all",
        help="1: experiments 1-3 (issue 15), 2: experiments 4-5 (issue 21), all: both",
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "paper_mini")
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared/data/tinyshakespeare/input.txt"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="seeds (part 1: quick 0-2, full 0-4; part 2: 0-1, 0-2)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(
            f"paper_mini: {args.data} not found; pass --data path/to/tinyshakespeare/input.txt"
        )
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    plan = QUICK if args.quick else FULL
    plan2 = QUICK2 if args.quick else FULL2
    seeds = args.seeds or list(plan.seeds)
    seeds2 = args.seeds or list(plan2.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(
        f"paper_mini ({'quick' if args.quick else 'full'}, part {args.part}): {plan}, {plan2}",
        flush=True,
    )
    sections: list[str] = []
    results: dict = {"plan": plan.__dict__, "plan2": plan2.__dict__}
    rev = None
    if args.part in ("1", "all"):
        lm = likelihood(plan, args.data, seeds[0])
        rev = reversal(plan, args.data, seeds)
        results.update(likelihood=lm, reversal=rev)
        sections += part_one_text(lm, rev, plan, seeds)
    if args.part in ("2", "all"):
        lad = ladder(plan2, args.data, seeds2[0])
        poem = poems(plan2, args.data, seeds2)
        results.update(ladder=lad, poems=poem)
        sections += part_two_text(lad, poem, plan2, rev)
    seconds = time.perf_counter() - t0
    results["seconds"] = seconds
    text = "\n\n".join([*sections, f"wall time {seconds:.0f}s"])
    print("\n" + text)
    (args.out / "tables.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    paths = plots(lm, rev, args.out) if "likelihood" in results else []
    paths += block_plots(lad, poem, plan2, args.out) if "ladder" in results else []
    for p in paths:
        print(f"wrote {p}")


def part_one_text(lm: dict, rev: dict, plan: Plan, seeds: list[int]) -> list[str]:
    """The headings and tables of experiments 1-3."""
    seed_list = " ".join(map(str, seeds))
    return [
        f"## 1. Likelihood at equal compute (seed {seeds[0]}; {plan.lm_steps} steps x "
        f"{plan.lm_batch} x {plan.lm_seq} tokens; {lm['test_chars']} held-out chars; "
        f"bound with {plan.elbo_samples} samples per window)",
        likelihood_table(lm),
        f"## 2. Reversal curse ({rev['facts']} facts, {rev['queries']} one-phrasing queries per "
        f"direction, seeds {seed_list}; size {plan.fact_size}, {rev['params']:,} params, "
        f"{rev['flops']:.2e} train FLOPs each; mean +- 1.96 std/sqrt(n))",
        reversal_table(rev),
        f"## 3. Sampling speed vs quality (forward completions, seeds {seed_list})",
        speed_table(rev),
    ]


if __name__ == "__main__":
    main()
