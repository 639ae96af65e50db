"""Prepare the whole demo data folder in seconds, offline.

``python -m data_pipelines.demo --out runs/demo/data`` writes::

    corpus/part-*.txt   generated documents, one per line
    chat.jsonl          generated dialogues ({"messages": [...]})
    rl_prompts.jsonl    more dialogues of another seed: llada-rl's prompts (the last answer is gold)
    tokenizer.json      byte-level BPE, vocab 512, specials at ids 0..5 (+ HF config files)
    shards/             manifest.json + token shards (pre-training data)
    sft/                SFT records built from chat.jsonl
    demo.json           what was built and with which settings (a rerun with the same is a no-op)
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from data_pipelines import demo_corpus
from data_pipelines.sft_records import RecordSpec, build_records
from data_pipelines.sources import SourceSpec
from data_pipelines.tokenize import tokenize_to_shards
from data_pipelines.train_tokenizer import save_tokenizer, train_bpe
from llada_train.atomic import write_json_atomic
from llada_train.errors import exit_on_error

RL_SEED_OFFSET = 7919  # rl_prompts.jsonl's seed = seed + this (not the SFT set's, not the report's)


def prepare_demo(
    out: str | Path,
    seed: int = 0,
    documents: int = 6000,
    dialogues: int = 3000,
    vocab_size: int = 512,
    shard_tokens: int = 1 << 16,
    num_workers: int = 1,
    force: bool = False,
    progress: bool = False,
    answers: str = "sentence",
) -> dict[str, Any]:
    """Build (or reuse, when up to date) the demo data folder; returns the summary in demo.json."""
    out = Path(out)
    settings = {
        "seed": seed,
        "documents": documents,
        "dialogues": dialogues,
        "vocab_size": vocab_size,
        "shard_tokens": shard_tokens,
        "version": 1,
    }
    if answers != "sentence":  # the default leaves demo.json as before: old folders stay reusable
        settings["answers"] = answers
    marker = out / "demo.json"
    rl_prompts = out / "rl_prompts.jsonl"
    if not force and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("settings") == settings:
            if not rl_prompts.is_file():  # a folder built before llada-rl
                demo_corpus.write_chat(rl_prompts, dialogues, seed + RL_SEED_OFFSET, answers)
            return done
    t0 = time.perf_counter()
    files = demo_corpus.write_corpus(out / "corpus", documents, seed)
    chat = demo_corpus.write_chat(out / "chat.jsonl", dialogues, seed, answers)
    demo_corpus.write_chat(rl_prompts, dialogues, seed + RL_SEED_OFFSET, answers)
    # train on documents and chat contents so question words get merges too; always on the
    # sentence answers (whose words hold the short ones'), so both styles share one tokenizer
    dialogs = demo_corpus.generate_dialogues(dialogues, seed)
    texts = itertools.chain(
        (p.read_text() for p in files), (m["content"] for d in dialogs for m in d)
    )
    tok_path = save_tokenizer(train_bpe(files, vocab_size, texts=texts), out)
    manifest = tokenize_to_shards(
        SourceSpec(inputs=[str(out / "corpus")], txt_doc="line"),
        str(tok_path),
        out / "shards",
        shard_tokens,
        num_workers,
        overwrite=True,
        progress=progress,
    )
    sft = build_records(
        SourceSpec(inputs=[str(chat)]), str(tok_path), out / "sft", RecordSpec(max_length=256)
    )
    summary = {
        "settings": settings,
        "tokenizer": str(tok_path),
        "shards": str(out / "shards"),
        "sft": str(out / "sft"),
        "num_documents": manifest["num_documents"],
        "num_tokens": manifest["num_tokens"],
        "num_sft_records": sft["num_records"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json_atomic(marker, summary)
    return summary


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m data_pipelines.demo --out runs/demo/data``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo/data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--documents", type=int, default=6000)
    ap.add_argument("--dialogues", type=int, default=3000)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument(
        "--answers",
        choices=demo_corpus.ANSWER_STYLES,
        default="sentence",
        help="chat answers: full sentences, or only the asked-for part",
    )
    a = ap.parse_args(argv)
    s = prepare_demo(
        a.out, a.seed, a.documents, a.dialogues, a.vocab_size, force=a.force, answers=a.answers
    )
    print(
        f"demo data in {a.out}: {s['num_documents']:,} documents, {s['num_tokens']:,} tokens, "
        f"{s['num_sft_records']:,} SFT records (built in {s['seconds']} s)"
    )


if __name__ == "__main__":
    main()
