"""Summarise the demo: loss at start and end, then completions sampled from the exports.

    python -m llada_train.cli.demo_report --run-dir runs/demo/pretrain \
        [--sft-dir runs/demo/sft --chat runs/demo/data/chat.jsonl]

With ``--sft-dir`` it also prints chat completions of the SFT model next to the base model's,
and both models' accuracy on held-out dialogues of each kind (drawn with another seed; any
dialogue that also occurs in ``--chat``, the SFT training set, is left out). The reference
answers take the chat set's answer style (``--answers``, else ``demo.json`` beside ``--chat``).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import defaultdict
from pathlib import Path

import torch

from data_pipelines.demo_corpus import ANSWER_STYLES, generate_dialogues
from llada_train.chat import ChatEncoder
from llada_train.cli.plot import read_metrics
from llada_train.errors import exit_on_error
from llada_train.model import load_pretrained
from llada_train.sample import generate
from llada_train.tokenizer import load_tokenizer


def sample_chats(answers: str = "sentence") -> list[list[dict[str, str]]]:
    """The chats shown base vs SFT; the earlier assistant turn is in the SFT data's style."""
    earlier = "6 plus 2 is 8 ." if answers == "sentence" else "8 ."
    return [
        [{"role": "user", "content": "what is 3 plus 4 ?"}],
        [{"role": "user", "content": "what does a duck say ?"}],
        [{"role": "user", "content": "what colour is the sky ?"}],
        [
            {"role": "user", "content": "what is 6 plus 2 ?"},
            {"role": "assistant", "content": earlier},
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


HELD_OUT_SEED = 20_261_202  # not the corpus's seed: fresh draws of the same templates
KINDS = ("arithmetic", "animal sounds", "animal legs", "colours", "stories", "multi-turn")


def dialogue_kind(messages: list[dict[str, str]]) -> str:
    """The question kind of a demo dialogue (multi-turn wins over the topic)."""
    if len(messages) > 2:
        return "multi-turn"
    q = messages[0]["content"]
    if " gives " in q:
        return "stories"
    if " plus " in q or " minus " in q:
        return "arithmetic"
    if " say " in q:
        return "animal sounds"
    if " legs " in q:
        return "animal legs"
    return "colours"


def held_out_dialogues(
    per_kind: int, seen: set[str], answers: str = "sentence"
) -> tuple[dict[str, list[list[dict[str, str]]]], set[str]]:
    """``per_kind`` fresh dialogues of each kind, none of them in ``seen`` (json of training
    messages) where the kind has enough unseen ones, and the kinds where it has not.
    ``answers`` is the SFT data's answer style (``demo_corpus.ANSWER_STYLES``).

    Animal and colour questions are few (10 animals, 12 things) and all occur in the SFT set,
    so those kinds test recall of trained facts; arithmetic, stories and multi-turn dialogues
    are held out.
    """
    unseen: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
    fresh: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
    for messages in generate_dialogues(50 * per_kind * len(KINDS), HELD_OUT_SEED, answers):
        kind = dialogue_kind(messages)
        bucket = fresh[kind] if json.dumps(messages) in seen else unseen[kind]
        if len(bucket) < per_kind:
            bucket.append(messages)
    trained = {k for k in KINDS if len(unseen[k]) < per_kind}
    return {k: (fresh[k] + unseen[k])[:per_kind] if k in trained else unseen[k] for k in KINDS}, trained


def accuracy_by_kind(
    export_dir: Path, buckets: dict[str, list[list[dict[str, str]]]], chat: ChatEncoder
) -> dict[str, tuple[int, int]]:
    """(right, asked) per kind: the completion must equal the reference answer exactly."""
    kinds = [k for k in KINDS if buckets.get(k)]
    dialogues = [d for k in kinds for d in buckets[k]]
    prompts = [chat.encode_prompt(d[:-1]) for d in dialogues]
    answers = complete(export_dir, prompts, gen_length=24)
    scores: dict[str, tuple[int, int]] = {}
    i = 0
    for k in kinds:
        n = len(buckets[k])
        right = sum(
            a.split(" [+")[0] == d[-1]["content"]
            for a, d in zip(answers[i : i + n], dialogues[i : i + n], strict=True)
        )
        scores[k], i = (right, n), i + n
    return scores


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from ``metrics.jsonl``."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


@functools.cache
def load_export(export_dir: Path) -> tuple[torch.nn.Module, object]:
    """The model and tokenizer of an export, read once per report (sample chats and the
    accuracy table both decode with them)."""
    return load_pretrained(export_dir), load_tokenizer(export_dir)


def complete(export_dir: Path, prompts: list[list[int]], gen_length: int) -> list[str]:
    """Greedy low-confidence completions of tokenised prompts from a released-layout folder.

    The text is cut at the first EOS or ``<|eot_id|>``; ``[+N eos]`` counts the EOS fill after it.
    """
    model, tok = load_export(export_dir)
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
    parser.add_argument("--chat", type=Path, default=None,
                        help="the SFT training dialogues (jsonl); held-out questions avoid them")
    parser.add_argument("--per-kind", type=int, default=10, help="held-out dialogues per kind")
    parser.add_argument("--answers", choices=ANSWER_STYLES, default=None,
                        help="the SFT data's answer style (default: from demo.json beside --chat)")
    args = parser.parse_args()
    answers = args.answers or answer_style(args.chat)
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
    chats = sample_chats(answers)
    chat_ids = [chat.encode_prompt(messages) for messages in chats]
    base_out = complete(base, chat_ids, gen_length=24)
    sft_out = complete(args.sft_dir / "export", chat_ids, gen_length=24)
    print("\nchat completions, base model vs SFT model:")
    for messages, b, s in zip(chats, base_out, sft_out, strict=True):
        print(f"  user: {messages[-1]['content']}" + (f"  (after {len(messages) // 2} earlier turn)" if len(messages) > 1 else ""))
        print(f"    base: {b}")
        print(f"    sft : {s}")
    seen = set()
    if args.chat is not None:
        seen = {json.dumps(json.loads(line)["messages"]) for line in args.chat.read_text().splitlines()}
    buckets, trained = held_out_dialogues(args.per_kind, seen, answers)
    base_acc = accuracy_by_kind(base, buckets, chat)
    sft_acc = accuracy_by_kind(args.sft_dir / "export", buckets, chat)
    print(f"\naccuracy on fresh dialogues (exact answer, {answers} answers; {args.per_kind} per kind):")
    print(f"  {'kind':<14} {'base':>7} {'sft':>7}")
    for kind in sft_acc:
        (rb, n), (rs, _) = base_acc[kind], sft_acc[kind]
        note = "  (every such question is in the SFT data)" if kind in trained else "  (not in the SFT data)"
        print(f"  {kind:<14} {rb:>3}/{n:<3} {rs:>3}/{n:<3}{note if args.chat else ''}")
    total = sum(n for _, n in sft_acc.values())
    print(f"  {'all':<14} {sum(r for r, _ in base_acc.values()):>3}/{total:<3} "
          f"{sum(r for r, _ in sft_acc.values()):>3}/{total:<3}")


def answer_style(chat: Path | None) -> str:
    """The answer style recorded in ``demo.json`` beside the chat set ("sentence" if none)."""
    marker = None if chat is None else chat.parent / "demo.json"
    if marker is None or not marker.is_file():
        return "sentence"
    return json.loads(marker.read_text())["settings"].get("answers", "sentence")


def print_losses(stage: str, run_dir: Path) -> None:
    curve = loss_curve(run_dir)
    (s0, l0), (s1, l1) = curve[0], curve[-1]
    print(f"\n{stage} loss at step {s0}: {l0:.4f}   at step {s1}: {l1:.4f}   ({l1 / l0:.2f}x)")


if __name__ == "__main__":
    main()
