"""Summarise the demo: loss at start and end, then completions sampled from the exports.

    python -m llada_train.cli.demo_report --run-dir runs/demo/pretrain [--sft-dir runs/demo/sft]

With ``--sft-dir`` it also prints chat completions of the SFT model next to the base model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llada_train.chat import ChatEncoder
from llada_train.cli.plot import read_metrics
from llada_train.errors import exit_on_error
from llada_train.model import load_pretrained
from llada_train.sample import generate
from llada_train.tokenizer import load_tokenizer

CHATS = [
    [{"role": "user", "content": "what is 3 plus 4 ?"}],
    [{"role": "user", "content": "what does a duck say ?"}],
    [{"role": "user", "content": "what colour is the sky ?"}],
    [
        {"role": "user", "content": "what is 6 plus 2 ?"},
        {"role": "assistant", "content": "6 plus 2 is 8 ."},
        {"role": "user", "content": "and what is 8 minus 5 ?"},
    ],
]

PROMPTS = [
    "tom has 3 apples . mia gives him 4 more . now tom has",
    "2 plus 5 is",
    "a cow says",
    "the grass is",
    "lily went to the zoo . at the zoo she saw",
]


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from ``metrics.jsonl``."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def complete(export_dir: Path, prompts: list[list[int]], gen_length: int) -> list[str]:
    """Greedy low-confidence completions of tokenised prompts from a released-layout folder.

    The text is cut at the first EOS or ``<|eot_id|>``; ``[+N eos]`` counts the EOS fill after it.
    """
    model = load_pretrained(export_dir)
    tok = load_tokenizer(export_dir)
    cfg = model.config
    stops = {cfg.eos_token_id, tok.token_to_id("<|eot_id|>")}
    outs = []
    for ids in prompts:
        prompt = torch.tensor([ids])
        result = generate(
            model, prompt, gen_length=gen_length, steps=gen_length, block_length=gen_length,
            mask_token_id=cfg.mask_token_id,
        )
        new = result.tokens[0, prompt.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        tail = sum(t == cfg.eos_token_id for t in new[cut:])
        outs.append(tok.decode(new[:cut]).strip() + (f" [+{tail} eos]" if tail else ""))
    return outs


@exit_on_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="pre-training run")
    parser.add_argument("--sft-dir", type=Path, default=None, help="SFT run started from --run-dir's export")
    args = parser.parse_args()
    base = args.run_dir / "export"
    print_losses("pre-training", args.run_dir)
    tok = load_tokenizer(base)
    prompts = [tok.encode(p).ids for p in PROMPTS]
    print(f"\ncompletions of the pre-trained model ({base}):")
    for prompt, text in zip(PROMPTS, complete(base, prompts, gen_length=12), strict=True):
        print(f"  {prompt} [{text}]")
    if args.sft_dir is None:
        return
    print_losses("SFT", args.sft_dir)
    chat = ChatEncoder(tok)
    chat_ids = [chat.encode_prompt(messages) for messages in CHATS]
    base_out = complete(base, chat_ids, gen_length=24)
    sft_out = complete(args.sft_dir / "export", chat_ids, gen_length=24)
    print("\nchat completions, base model vs SFT model:")
    for messages, b, s in zip(CHATS, base_out, sft_out, strict=True):
        print(f"  user: {messages[-1]['content']}" + (f"  (after {len(messages) // 2} earlier turn)" if len(messages) > 1 else ""))
        print(f"    base: {b}")
        print(f"    sft : {s}")


def print_losses(stage: str, run_dir: Path) -> None:
    curve = loss_curve(run_dir)
    (s0, l0), (s1, l1) = curve[0], curve[-1]
    print(f"\n{stage} loss at step {s0}: {l0:.4f}   at step {s1}: {l1:.4f}   ({l1 / l0:.2f}x)")


if __name__ == "__main__":
    main()
