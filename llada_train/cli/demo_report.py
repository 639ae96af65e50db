"""Summarise a demo run: loss at start and end, then completions sampled from its export.

    python -m llada_train.cli.demo_report --run-dir runs/demo/pretrain [--sft-dir runs/demo/sft]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llada_train.errors import LladaError, exit_on_error
from llada_train.model import load_pretrained
from llada_train.sample import generate
from llada_train.tokenizer import load_tokenizer

PROMPTS = [
    "tom has 3 apples . mia gives him 4 more . now tom has",
    "2 plus 5 is",
    "a cow says",
    "the grass is",
    "lily went to the zoo . at the zoo she saw",
]


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise LladaError(f"{path} not found: is {run_dir} a training run directory?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def complete(export_dir: Path, prompts: list[str], gen_length: int = 12) -> list[str]:
    """Greedy low-confidence completions of ``prompts`` from a released-layout folder."""
    model = load_pretrained(export_dir)
    tok = load_tokenizer(export_dir)
    cfg = model.config
    outs = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt).ids])
        result = generate(
            model, ids, gen_length=gen_length, steps=gen_length, block_length=gen_length,
            mask_token_id=cfg.mask_token_id,
        )
        new = result.tokens[0, ids.shape[1] :].tolist()
        if cfg.eos_token_id in new:  # text ends at the first EOS
            new = new[: new.index(cfg.eos_token_id)]
        outs.append(tok.decode(new))
    return outs


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    curve = loss_curve(args.run_dir)
    (s0, l0), (s1, l1) = curve[0], curve[-1]
    print(f"\nloss at step {s0}: {l0:.4f}   loss at step {s1}: {l1:.4f}   ({l1 / l0:.2f}x)")
    print(f"\ncompletions of the trained model ({args.run_dir / 'export'}):")
    for prompt, text in zip(PROMPTS, complete(args.run_dir / "export", PROMPTS), strict=True):
        print(f"  {prompt} [{text.strip()}]")


if __name__ == "__main__":
    main()
