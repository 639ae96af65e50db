"""Accuracy and NFE of every sampler on a synthetic task with checkable answers.

A small LLaDA model is trained with ``SFTObjective`` (plain AdamW loop, CPU) on chained
modular arithmetic written out step by step, e.g. prompt ``3+4*2-5=`` and response
``3+4=7,7*2=4,4-5=9,#9`` followed by EOS padding. The same held-out problems are then
decoded with each method and the final answer after ``#`` is checked.

    python benchmarks/sample_bench.py            # ~40 min on a busy 2-core CPU (10 train, 20 block
                                                 # twin, 8 decode); --twin-block 0 skips the twin
    python benchmarks/sample_bench.py --quick    # short run: 800 steps leave the model near chance
    python benchmarks/sample_bench.py --smoke    # seconds: every code path, numbers meaningless

Targets (issue 6): MED and threshold decoding need >= 2.5x fewer NFE than one token per
step at <= 1 point lower accuracy; HEX and TOLERATOR beat a single schedule with the same
number of tokens per step (HEX) or the same forward-pass budget (TOLERATOR, over a sweep of
budgets, with a summary line per budget).

Block decoding (issue 21) gets a speed table at generation length 256 with blocks of 32:
tokens/s and NFE of ``block_generate`` with its exact KV cache, the same without the cache
(the prefix re-run every step; same tokens), and full-diffusion low-confidence decoding
(``generate``, semi-AR block 32, one token per step) on the same model and prompts. Target:
the cached block decoder at >= 3x the full-diffusion tokens/s. Decoding speed does not depend
on how the weights were trained, so these rows decode the full-diffusion model with
block-causal attention (``--speed-block``). Accuracy comes from a block twin: the same model
trained with ``objective=block`` (``--twin-block``, blocks of 8; same data, steps and seed),
decoded with ``decode=block`` on the benchmark's task, rows in the main table.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llada_train.diffusion import ObjectiveConfig, SFTObjective, build_objective  # noqa: E402
from llada_train.model import LLaDAModel, ModelConfig  # noqa: E402
from llada_train.sample import (  # noqa: E402
    fast_generate,
    generate,
    hex_generate,
    med_generate,
    tolerator_generate,
)
from llada_train.sample.block import block_generate  # noqa: E402

# ---------------------------------------------------------------- the task and its vocabulary

CHARS = "0123456789+-*=,#"
BOS, EOS, MASK = 0, 1, 2  # ids are configuration: this tiny tokenizer picks its own
OFFSET = 3
VOCAB = OFFSET + len(CHARS) + 1  # one spare id, unused
OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}


def encode(text: str) -> list[int]:
    return [OFFSET + CHARS.index(c) for c in text]


def decode(ids: list[int]) -> str:
    out = []
    for t in ids:
        if t == EOS:
            break
        out.append(CHARS[t - OFFSET] if OFFSET <= t < OFFSET + len(CHARS) else "?")
    return "".join(out)


def extract(text: str) -> str | None:
    """The digit after the last ``#``; None when the response has no final answer."""
    tail = text.rsplit("#", 1)
    return tail[1][:1] if len(tail) == 2 and tail[1][:1].isdigit() else None


def make_problem(rng: random.Random, n_ops: int) -> tuple[str, str, str]:
    """(prompt, response, answer) for one chained problem, worked left to right mod 10."""
    nums = [rng.randrange(10) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-*") for _ in range(n_ops)]
    prompt = str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:], strict=True)) + "="
    acc, steps = nums[0], []
    for o, n in zip(ops, nums[1:], strict=True):
        new = OPS[o](acc, n)
        steps.append(f"{acc}{o}{n}={new}")
        acc = new
    return prompt, ",".join(steps) + f",#{acc}", str(acc)


@dataclass
class Task:
    n_ops: int = 4

    @property
    def gen_length(self) -> int:
        """Room for the response (6 tokens per operation + '#' and the answer) plus some EOS."""
        return -(-(6 * self.n_ops + 2 + 4) // 8) * 8

    @property
    def hex_blocks(self) -> tuple[int, ...]:
        """Semi-AR block sizes for HEX: powers of two from 2 that divide gen_length, then gen_length."""
        G = self.gen_length
        return tuple(sorted({b for b in (2, 4, 8, 16, 32, 64) if b < G and G % b == 0} | {G}))

    @property
    def prompt_length(self) -> int:
        return 1 + 2 * self.n_ops + 2  # BOS, digits and ops, '='

    def batch(self, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
        rows, answers = [], []
        for _ in range(size):
            prompt, response, answer = make_problem(rng, self.n_ops)
            ids = [BOS, *encode(prompt)]
            resp = encode(response)
            rows.append(ids + resp + [EOS] * (self.gen_length - len(resp)))  # EOS padding is response
            answers.append(answer)
        return {
            "input_ids": torch.tensor(rows),
            "prompt_len": torch.full((size,), self.prompt_length),
            "answers": answers,
        }


# ---------------------------------------------------------------- training


def build_model(seed: int, block_size: int = 0) -> LLaDAModel:
    cfg = ModelConfig(
        d_model=96, n_layers=3, n_heads=4, n_kv_heads=4, mlp_hidden_size=256, vocab_size=VOCAB,
        max_sequence_length=64, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=BOS,
        block_size=block_size,
    )
    torch.manual_seed(seed)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def train(
    task: Task, steps: int, batch_size: int, seed: int, log_every: int = 100, block_size: int = 0
) -> LLaDAModel:
    """SFT on fresh random problems each step: AdamW, linear warmup then linear decay.
    ``block_size`` > 0 trains the block twin (``objective=block``, BD3-LM defaults)."""
    model = build_model(seed, block_size)
    objective = (
        build_objective(ObjectiveConfig(name="block", block_size=block_size), MASK, EOS)
        if block_size else SFTObjective(ObjectiveConfig(name="sft"), MASK)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)
    )
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        batch = task.batch(rng, batch_size)
        loss = objective(model, batch, gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"  step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
    return model.eval()


# ---------------------------------------------------------------- evaluation


def accuracy(generated: torch.Tensor, answers: list[str]) -> float:
    preds = [extract(decode(row)) for row in generated.tolist()]
    return 100.0 * sum(p == a for p, a in zip(preds, answers, strict=True)) / len(answers)


TOLERATOR_BUDGETS = (4, 6, 8, 10, 12, 16)


def budget_row_names(budget: int) -> tuple[str, str]:
    """Table names of (low-confidence, TOLERATOR) at one forward-pass budget."""
    return f"low-confidence (steps={budget})", f"TOLERATOR (budget={budget}, rho=0.5)"


def run_methods(model: LLaDAModel, task: Task, n_eval: int, seed: int) -> list[tuple[str, float, float, float]]:
    """(method, accuracy %, mean NFE per problem, decode seconds) rows, in table order."""
    data = task.batch(random.Random(seed + 1), n_eval)
    prompts = data["input_ids"][:, : task.prompt_length]
    answers = data["answers"]
    G = task.gen_length
    kw = {"mask_token_id": MASK}
    rows: list[tuple[str, float, float, float]] = []

    def add(name: str, run) -> None:
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
        if hasattr(out, "answers"):  # HEX: voted answers, NFE summed over members
            acc = 100.0 * sum(p == a for p, a in zip(out.answers, answers, strict=True)) / len(answers)
            rows.append((name, acc, float(out.nfe), seconds))
        else:  # row_nfe: what each problem would cost decoded alone
            rows.append((name, accuracy(out.generated, answers), out.row_nfe.double().mean().item(), seconds))

    add(f"low-confidence, 1 token/step (steps={G})", lambda: generate(model, prompts, G, G, G, **kw))
    add(f"semi-AR block 8, 1 token/step (steps={G})", lambda: generate(model, prompts, G, G, 8, **kw))
    add("MED (lambda=0.2)", lambda: med_generate(model, prompts, G, G, entropy_threshold=0.2, **kw))
    add("threshold (tau=0.9)", lambda: fast_generate(model, prompts, G, G, threshold=0.9, **kw))
    add("threshold (tau=0.9), block 8",
        lambda: fast_generate(model, prompts, G, 8, threshold=0.9, **kw))
    add("threshold (tau=0.9), block 8 + prefix KV cache",
        lambda: fast_generate(model, prompts, G, 8, threshold=0.9, use_cache=True, **kw))
    # HEX against the single schedules it is made of: same 2 tokens per step
    half = G // 2
    for b in (G, 8):
        add(f"low-confidence block {b}, 2 tokens/step (steps={half})",
            lambda b=b: generate(model, prompts, G, half, b, **kw))
    add(f"HEX blocks {task.hex_blocks}, 2 tokens/step",
        lambda: hex_generate(model, prompts, G, decode=decode, extract=extract, block_lengths=task.hex_blocks,
                             tokens_per_step=2, **kw))
    # TOLERATOR against low-confidence decoding with the same number of forward passes,
    # over a sweep of budgets: it is a low-budget method, so where it stops paying matters
    for budget in TOLERATOR_BUDGETS:
        base_name, tol_name = budget_row_names(budget)
        add(base_name, lambda budget=budget: generate(model, prompts, G, budget, G, **kw))
        add(tol_name,
            lambda budget=budget: tolerator_generate(model, prompts, G, budget, eot_token_ids=[EOS],
                                                     generator=torch.Generator().manual_seed(seed), **kw))
    return rows


def block_twin_rows(
    twin: LLaDAModel, task: Task, n_eval: int, seed: int
) -> list[tuple[str, float, float, float]]:
    """Main-table rows of the block twin on the held-out problems of ``run_methods``: cached
    block decoding, one token per step and LLaDA 2.0's threshold rule, stopping at EOS."""
    data = task.batch(random.Random(seed + 1), n_eval)
    prompts = data["input_ids"][:, : task.prompt_length]
    b = twin.config.block_size
    kw = {"mask_token_id": MASK, "eos_token_id": EOS}
    rows = []
    for name, extra in ((f"block twin (block {b}) + cache, 1 token/step", {}),
                        (f"block twin (block {b}) + cache, threshold 0.9", {"threshold": 0.9})):
        t0 = time.perf_counter()
        out = block_generate(twin, prompts, task.gen_length, **extra, **kw)
        seconds = time.perf_counter() - t0
        rows.append((name, accuracy(out.generated, data["answers"]), out.row_nfe.double().mean().item(), seconds))
    return rows


def block_speed_rows(
    model: LLaDAModel, task: Task, n_prompts: int, gen_length: int, block: int, seed: int
) -> list[tuple[str, float, float, float]]:
    """(method, tokens/s, mean NFE per prompt, seconds) on the same prompts: block decoding
    with and without its cache (no EOS stop, so every row decodes the whole length), the
    cached decoder stopping at EOS, and full-diffusion low-confidence decoding."""
    prompts = task.batch(random.Random(seed + 2), n_prompts)["input_ids"][:, : task.prompt_length]
    kw = {"mask_token_id": MASK}
    rows: list[tuple[str, float, float, float]] = []
    outs = {}

    def add(name: str, run) -> None:
        t0 = time.perf_counter()
        out = outs[name] = run()
        seconds = time.perf_counter() - t0
        lengths = getattr(out, "lengths", None)  # block rows: tokens up to each row's end
        tokens = int(lengths.sum()) if lengths is not None else out.generated.numel()
        rows.append((name, tokens / seconds, out.row_nfe.double().mean().item(), seconds))

    steps = gen_length  # one token per step everywhere
    blk = dict(block_size=block, eos_token_id=EOS, **kw)
    add(f"block {block} + exact KV cache", lambda: block_generate(model, prompts, gen_length, stop_at_eos=False, **blk))
    add(f"block {block}, no cache", lambda: block_generate(model, prompts, gen_length, use_cache=False,
                                                           stop_at_eos=False, **blk))
    add(f"block {block} + cache, stop at EOS", lambda: block_generate(model, prompts, gen_length, **blk))
    add(f"full-diffusion low-confidence (semi-AR {block}, steps={steps})",
        lambda: generate(model, prompts, gen_length, steps, block, **kw))
    cached, plain = outs[f"block {block} + exact KV cache"], outs[f"block {block}, no cache"]
    if not torch.equal(cached.tokens, plain.tokens):
        raise SystemExit("block decoding: the cached and uncached tokens differ (the cache must be exact)")
    return rows


def print_block_speed(rows: list[tuple[str, float, float, float]], n_prompts: int, gen_length: int) -> None:
    """The block-decoding speed table, ratios against the full-diffusion row (the last)."""
    base = rows[-1][1]
    print(f"\nblock decoding speed: {n_prompts} prompts in one batch, gen_length={gen_length} "
          "(block rows decode whole blocks: up to one block more)\n")
    print(f"| {'method':55s} | tokens/s | mean NFE | tokens/s vs full | decode s |")
    print(f"|{'-' * 57}|---------:|---------:|-----------------:|---------:|")
    for name, tps, nfe, seconds in rows:
        print(f"| {name:55s} | {tps:8.1f} | {nfe:8.1f} | {tps / base:15.2f}x | {seconds:8.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter training and fewer problems")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny training and decode sizes")
    parser.add_argument("--speed-prompts", type=int, default=None, help="prompts in the block speed table")
    parser.add_argument("--speed-length", type=int, default=None, help="gen_length of the block speed table")
    parser.add_argument("--speed-block", type=int, default=32, help="block size of the block speed table")
    parser.add_argument("--twin-block", type=int, default=8, help="block size of the block twin (0: no twin)")
    parser.add_argument("--save-twin", type=Path, default=None, help="save the block twin's weights here (safetensors)")
    parser.add_argument("--load-twin", type=Path, default=None, help="load the block twin instead of training it")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", type=int, default=4, help="operations per problem (chain length)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save", type=Path, default=None, help="save the trained weights here (safetensors)")
    parser.add_argument("--load", type=Path, default=None, help="skip training: load a saved state_dict")
    args = parser.parse_args()
    steps = args.steps or (20 if args.smoke else 800 if args.quick else 3000)
    # 1000 problems: a point of accuracy is 10 problems, so budget-to-budget gaps are not noise
    n_eval = args.n_eval or (8 if args.smoke else 200 if args.quick else 1000)
    speed_prompts = args.speed_prompts or (2 if args.smoke else 16)
    speed_length = args.speed_length or (32 if args.smoke else 256)
    speed_block = 8 if args.smoke and args.speed_block == 32 else args.speed_block
    # one thread: small matmuls gain little from more, and shared CPUs punish oversubscription
    torch.set_num_threads(args.threads)
    task = Task(n_ops=args.ops)
    t0 = time.time()
    if args.load:
        model = build_model(args.seed)
        model.load_state_dict(load_file(args.load))
        model.eval()
    else:
        print(f"training {steps} steps (batch {args.batch_size}) on {task.n_ops}-step arithmetic mod 10 ...",
              flush=True)
        model = train(task, steps, args.batch_size, args.seed)
    if args.save:
        save_file(model.state_dict(), args.save)  # safetensors: loading runs no code
    twin = None
    if args.twin_block and args.load_twin:
        twin = build_model(args.seed, args.twin_block)
        twin.load_state_dict(load_file(args.load_twin))
        twin.eval()
    elif args.twin_block:
        print(f"training the block twin (objective=block, block {args.twin_block}), {steps} steps ...", flush=True)
        twin = train(task, steps, args.batch_size, args.seed, block_size=args.twin_block)
    if twin is not None and args.save_twin:
        save_file(twin.state_dict(), args.save_twin)
    t_train = time.time() - t0
    with torch.no_grad():
        rows = run_methods(model, task, n_eval, args.seed)
        if twin is not None:
            rows += block_twin_rows(twin, task, n_eval, args.seed)
        speed = block_speed_rows(model, task, speed_prompts, speed_length, speed_block, args.seed)
    base_acc, base_nfe = rows[0][1], rows[0][2]
    print(f"\n{n_eval} held-out problems, gen_length={task.gen_length}; train {t_train:.0f}s, "
          f"decode {time.time() - t0 - t_train:.0f}s\n")
    print(f"| {'method':50s} | accuracy % | mean NFE | NFE vs 1/step | decode s |")
    print(f"|{'-' * 52}|-----------:|---------:|--------------:|---------:|")
    for name, acc, nfe, seconds in rows:
        print(f"| {name:50s} | {acc:10.1f} | {nfe:8.1f} | {base_nfe / nfe:12.2f}x | {seconds:8.1f} |")
    print(f"\n(reference: one token per step, {base_acc:.1f}% at {base_nfe:.0f} NFE)")
    print(tolerator_summary(rows))
    print_block_speed(speed, speed_prompts, speed_length)


def tolerator_summary(rows: list[tuple[str, float, float, float]]) -> str:
    """One line per budget: TOLERATOR minus low-confidence accuracy at the same NFE."""
    acc = {name: a for name, a, _, _ in rows}
    lines = ["TOLERATOR vs low-confidence at the same budget (accuracy points):"]
    for budget in TOLERATOR_BUDGETS:
        base, tol = (acc[name] for name in budget_row_names(budget))
        lines.append(f"  budget {budget:2d}: {tol:5.1f} vs {base:5.1f}  ({tol - base:+5.1f}, {'beats' if tol > base else 'does not beat'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
