"""Post-training after the demo's SFT: continued SFT (the control) vs VRPO vs ESPO, measured.

    python benchmarks/post_train.py                  # after `make demo`: runs/demo/sft/export
    python benchmarks/post_train.py --quick          # the wiring at toy sizes (CI)

1. Held-out questions: the final turns of ``--eval`` demo dialogues of a fresh seed (none of
   them in the SFT chat set or the RL prompts). The SFT model's greedy pass@1, and pass@8 at
   T = 1: RL can only turn answers the model sometimes samples into its greedy answer.
2. Three arms, each ``--updates`` optimizer steps of ``--prompts`` prompts from the RL prompt
   set (``rl_prompts.jsonl``), for every seed in ``--seeds``:
   - ``sft``: ``llada-sft`` on those dialogues' gold answers (every turn: more supervision
     than the RL arms get);
   - ``vrpo``: ``llada-dpo`` on pairs (a correct answer, one of the SFT model's own wrong
     samples). The correct answer is a verified self-sample when the model produced one,
     else the gold answer: the table reports that share (gold pairs are partly supervised);
   - ``espo``: ``llada-rl`` with the binary exact-match reward.
3. Each arm's greedy pass@1 on the held-out questions, averaged over seeds, with a 95%
   bootstrap interval over questions, and the paired difference to the control.

Every stage writes its result under ``--out`` and is skipped when rerun, so an interrupted
benchmark continues where it stopped. The table is ``--out/post_train.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.demo_corpus import generate_dialogues  # noqa: E402
from llada_train.chat import ChatEncoder  # noqa: E402
from llada_train.eval.decode import decode_batch, decode_config  # noqa: E402
from llada_train.model import load_pretrained  # noqa: E402
from llada_train.sample.common import left_pad  # noqa: E402
from llada_train.tokenizer import load_tokenizer  # noqa: E402

EVAL_SEED = 20_261_203  # neither the SFT set's seed (0), the RL prompts' (7919) nor the report's
GEN = 24  # the demo report's answer length (greedy: one token per step, one block)
ARMS = ("sft", "vrpo", "espo")


def final_turns(dialogues: list[list[dict[str, str]]]) -> list[tuple[list[dict[str, str]], str]]:
    """(history up to the last question, gold last answer) of each dialogue."""
    return [(d[:-1], d[-1]["content"]) for d in dialogues]


def held_out(n: int, data: Path, answers: str) -> list[tuple[list[dict[str, str]], str]]:
    """``n`` final turns of fresh dialogues, none equal to a training or RL-prompt dialogue."""
    seen = set()
    for name in ("chat.jsonl", "rl_prompts.jsonl"):
        seen |= {json.dumps(json.loads(x)["messages"]) for x in (data / name).read_text().splitlines()}
    fresh = [d for d in generate_dialogues(20 * n, EVAL_SEED, answers) if json.dumps(d) not in seen]
    if len(fresh) < n:
        raise SystemExit(f"error: only {len(fresh)} fresh held-out dialogues; lower --eval")
    return final_turns(fresh[:n])


class Judge:
    """Completions of one export, and exact-match scores against gold answers."""

    def __init__(self, export: Path, tokenizer: Path) -> None:
        self.model = load_pretrained(export).eval()
        self.tok = load_tokenizer(tokenizer)
        self.chat = ChatEncoder(self.tok)
        cfg = self.model.config
        self.mask, self.eos = cfg.mask_token_id, cfg.eos_token_id
        self.eot = self.tok.token_to_id("<|eot_id|>")

    def text(self, ids: list[int]) -> str:
        cut = next((i for i, t in enumerate(ids) if t in (self.eos, self.eot)), len(ids))
        return self.tok.decode(ids[:cut]).strip()

    def complete(self, histories: list[list[dict[str, str]]], temperature: float = 0.0,
                 seed: int = 0, batch: int = 128) -> list[str]:  # fmt: skip
        cfg = decode_config("low_confidence", gen_length=GEN, steps=GEN, block_length=GEN,
                            temperature=temperature)  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        out: list[str] = []
        for i in range(0, len(histories), batch):
            prompts = [self.chat.encode_prompt(h) for h in histories[i : i + batch]]
            ids, attention = left_pad(prompts, self.eos)
            with torch.no_grad():
                result = decode_batch(self.model, ids, attention, cfg, mask_token_id=self.mask,
                                      eos_token_id=self.eos, eot_token_id=self.eot,
                                      decode=self.text, extract=lambda _t: None,
                                      generator=generator)  # fmt: skip
            out += [self.text(row) for row in result.generated.tolist()]
        return out

    def correct(self, turns: list[tuple[list[dict[str, str]], str]], **kw: Any) -> np.ndarray:
        texts = self.complete([h for h, _ in turns], **kw)
        return np.array([t == gold.strip() for t, (_, gold) in zip(texts, turns, strict=True)])


def cached(path: Path, make: Any) -> Any:
    """``make()``'s JSON result, computed once: a rerun reads it back."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def sh(cmd: list[str], log: Path) -> float:
    """Run a console script of this environment; its output goes to ``log``; wall seconds."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:2])} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def preference_pairs(judge: Judge, turns: list, samples: int, out: Path) -> dict[str, Any]:
    """Pairs (correct answer, own wrong sample) written as preference JSONL; their counts."""
    histories = [h for h, _ in turns]
    drawn = [judge.complete(histories, temperature=1.0, seed=100 + k) for k in range(samples)]
    rows, self_chosen = [], 0
    for i, (history, gold) in enumerate(turns):
        texts = [d[i] for d in drawn]
        wrong = [t for t in texts if t != gold.strip() and t]
        if not wrong:
            continue
        right = [t for t in texts if t == gold.strip()]
        self_chosen += bool(right)
        rows.append({"messages": history, "chosen": right[0] if right else gold, "rejected": wrong[0]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pairs": len(rows), "self_sample_chosen": self_chosen, "prompts": len(turns)}


def bootstrap(correct: np.ndarray, base: np.ndarray | None, draws: int, seed: int) -> dict:
    """Mean accuracy over seeds x questions with a 95% interval from resampling questions;
    with ``base`` (the control's matrix) also the paired difference and its interval."""
    rng = np.random.default_rng(seed)
    per_q = correct.mean(axis=0)  # (Q,) mean over seeds
    idx = rng.integers(0, per_q.size, size=(draws, per_q.size))
    boot = per_q[idx].mean(axis=1)
    out = {"acc": float(per_q.mean()), "lo": float(np.quantile(boot, 0.025)),
           "hi": float(np.quantile(boot, 0.975))}  # fmt: skip
    if base is not None:
        diff_q = per_q - base.mean(axis=0)
        dboot = diff_q[idx].mean(axis=1)
        out.update(diff=float(diff_q.mean()), diff_lo=float(np.quantile(dboot, 0.025)),
                   diff_hi=float(np.quantile(dboot, 0.975)))  # fmt: skip
    return out


def arm_command(arm: str, a: argparse.Namespace, seed: int, run_dir: Path, inputs: dict) -> list[str]:
    """The console command of one arm's run (the same updates and prompts per update)."""
    bin_dir = Path(sys.executable).parent
    common = [
        f"run_dir={run_dir}", f"init_from={a.sft_dir}", f"seed={seed}", "trainer.epochs=0",
        f"trainer.max_steps={a.updates}", f"trainer.global_batch_size={a.prompts}",
        f"trainer.micro_batch_size={a.prompts}", "trainer.save_every=0", "trainer.keep_last=1",
        "logging.progress_bar=false", "logging.log_every=1", "schedule=constant",
        f"schedule.warmup_steps={min(4, a.updates)}", f"data.tokenizer={a.data / 'tokenizer.json'}",
    ]  # fmt: skip
    if arm == "sft":
        return [str(bin_dir / "llada-sft"), *common, "data=sft_demo", f"data.path={inputs['sft']}",
                "trainer.seq_len=256", f"schedule.peak_lr={a.lr_sft}"]  # fmt: skip
    if arm == "vrpo":
        return [str(bin_dir / "llada-dpo"), *common, f"data.path={inputs['vrpo']}",
                "trainer.seq_len=256", f"schedule.peak_lr={a.lr_vrpo}",
                f"objective.beta={a.vrpo_beta}"]  # fmt: skip
    return [str(bin_dir / "llada-rl"), *common, f"data.path={a.data / 'rl_prompts.jsonl'}",
            "trainer.seq_len=200", f"schedule.peak_lr={a.lr_espo}",
            f"objective.group_size={a.group}", f"objective.inner_iterations={a.mu}",
            f"decode.gen_length={GEN}", f"decode.steps={GEN}", f"decode.block_length={GEN}"]  # fmt: skip


def reward_curve(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["rl/reward_mean"] for r in rows if "rl/reward_mean" in r]


def table(before: dict, results: dict, meta: dict) -> str:
    """The README table: accuracy before and after each arm, its difference to the control."""
    n_seeds = len(meta["seeds"])
    lines = [
        f"SFT model before: greedy pass@1 {before['pass1']:.3f}, pass@{meta['k']} at T = 1 "
        f"{before['passk']:.3f} ({meta['eval']} held-out questions)",
        "",
        f"| arm ({meta['updates']} updates x {meta['prompts']} prompts, {n_seeds} seeds) | "
        "pass@1 after [95% CI] | vs control [95% CI] | wall s / run | reward first -> last |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        r = results[arm]
        ci = f"{r['acc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
        vs = "(the control)" if arm == "sft" else (
            f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]")  # fmt: skip
        curve = r.get("reward_curve")
        reward = f"{curve[0]:.3f} -> {curve[-1]:.3f}" if curve else "-"
        lines.append(f"| {arm} | {ci} | {vs} | {r['wall_s']:.0f} | {reward} |")
    p = meta["pairs"]
    lines += ["", f"VRPO pairs: {p['pairs']} of {p['prompts']} prompts had a wrong sample; the "
              f"chosen answer was a verified self-sample in {p['self_sample_chosen']}, gold in the "
              f"other {p['pairs'] - p['self_sample_chosen']}."]  # fmt: skip
    return "\n".join(lines)


def quick_setup(a: argparse.Namespace) -> None:
    """--quick: demo data and an untrained 2-layer model stand in for `make demo`'s SFT model."""
    from data_pipelines.demo import prepare_demo
    from tests.model_utils import save_tiny_model

    a.data = a.out / "data"
    prepare_demo(a.data, answers="short")
    a.sft_dir = a.out / "sft_model"
    if not (a.sft_dir / "config.json").is_file():
        save_tiny_model(a.sft_dir, n_layers=2)
        (a.sft_dir / "tokenizer.json").write_bytes((a.data / "tokenizer.json").read_bytes())
    # sampling is most of its time: few questions and pair prompts (8 pairs still feed the
    # two updates of 4), the smallest ESPO group
    a.eval, a.k, a.updates, a.prompts, a.seeds, a.pair_prompts = 8, 2, 2, 4, [0], 8
    a.group = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-dir", type=Path, default=REPO / "runs/demo/sft/export")
    ap.add_argument("--data", type=Path, default=REPO / "runs/demo/data")
    ap.add_argument("--out", type=Path, default=REPO / "runs/post_train")
    ap.add_argument("--eval", type=int, default=500, help="held-out questions")
    ap.add_argument("--k", type=int, default=8, help="pass@k samples at T = 1")
    ap.add_argument("--updates", type=int, default=40, help="optimizer steps of every arm")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per update")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pair-prompts", type=int, default=300, help="RL prompts sampled for VRPO pairs")
    ap.add_argument("--lr-sft", type=float, default=2e-4)
    ap.add_argument("--lr-vrpo", type=float, default=2e-4)
    ap.add_argument("--lr-espo", type=float, default=2e-4)
    ap.add_argument("--vrpo-beta", type=float, default=0.1)
    ap.add_argument("--group", type=int, default=6, help="ESPO's G")
    ap.add_argument("--mu", type=int, default=2, help="ESPO's inner iterations")
    ap.add_argument("--quick", action="store_true", help="toy sizes: the wiring only (CI)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        quick_setup(a)
    if not (a.sft_dir / "config.json").is_file():
        raise SystemExit(f"error: no SFT model at {a.sft_dir}: run `make demo` first, or pass --sft-dir")
    answers = json.loads((a.data / "demo.json").read_text())["settings"].get("answers", "sentence")
    turns = held_out(a.eval, a.data, answers)
    judge = Judge(a.sft_dir, a.data / "tokenizer.json")

    def measure_before() -> dict:
        pass1 = judge.correct(turns).mean()
        hits = np.stack([judge.correct(turns, temperature=1.0, seed=s) for s in range(a.k)])
        return {"pass1": float(pass1), "passk": float(hits.any(axis=0).mean())}

    before = cached(a.out / "before.json", measure_before)
    print(f"before: greedy pass@1 {before['pass1']:.3f}, pass@{a.k} (T=1) {before['passk']:.3f}", flush=True)
    inputs = {"sft": a.out / "sft_records", "vrpo": a.out / "vrpo_records"}
    bin_dir = Path(sys.executable).parent
    if not (inputs["sft"] / "manifest.json").is_file():
        sh([str(bin_dir / "llada-sft-data"), "--input", str(a.data / "rl_prompts.jsonl"),
            "--tokenizer", str(a.data / "tokenizer.json"), "--out", str(inputs["sft"])],
           a.out / "sft_records.log")  # fmt: skip
    rl_turns = final_turns([json.loads(x)["messages"] for x in
                            (a.data / "rl_prompts.jsonl").read_text().splitlines()[: a.pair_prompts]])  # fmt: skip
    pairs = cached(a.out / "pairs.json",
                   lambda: preference_pairs(judge, rl_turns, 4, a.out / "pairs.jsonl"))  # fmt: skip
    if not (inputs["vrpo"] / "manifest.json").is_file():
        sh([str(bin_dir / "llada-preference-data"), "--input", str(a.out / "pairs.jsonl"),
            "--tokenizer", str(a.data / "tokenizer.json"), "--out", str(inputs["vrpo"])],
           a.out / "vrpo_records.log")  # fmt: skip
    results: dict[str, Any] = {}
    control = None
    for arm in ARMS:
        runs = []
        for seed in a.seeds:
            run_dir = a.out / arm / f"seed_{seed}"

            def train_and_judge(arm: str = arm, seed: int = seed, run_dir: Path = run_dir) -> dict:
                wall = sh(arm_command(arm, a, seed, run_dir, inputs), run_dir.with_suffix(".log"))
                correct = Judge(run_dir / "export", a.data / "tokenizer.json").correct(turns)
                curve = reward_curve(run_dir) if arm == "espo" else []
                return {"correct": correct.tolist(), "wall_s": wall, "reward_curve": curve}

            runs.append(cached(run_dir.with_suffix(".json"), train_and_judge))
            print(f"{arm} seed {seed}: pass@1 {np.mean(runs[-1]['correct']):.3f} "
                  f"({runs[-1]['wall_s']:.0f} s)", flush=True)  # fmt: skip
        matrix = np.array([r["correct"] for r in runs], dtype=float)  # (seeds, Q)
        results[arm] = bootstrap(matrix, control, 2000, 0)
        results[arm]["wall_s"] = float(np.mean([r["wall_s"] for r in runs]))
        if arm == "espo":
            results[arm]["reward_curve"] = np.mean([r["reward_curve"] for r in runs], axis=0).tolist()
        if arm == "sft":
            control = matrix
    meta = {"seeds": a.seeds, "updates": a.updates, "prompts": a.prompts, "eval": a.eval,
            "k": a.k, "pairs": pairs, "sft_dir": str(a.sft_dir)}  # fmt: skip
    text = table(before, results, meta)
    (a.out / "post_train.md").write_text(text + "\n")
    (a.out / "post_train.json").write_text(json.dumps({"before": before, "arms": results, "meta": meta}))
    print("\n" + text)


if __name__ == "__main__":
    main()
