"""``llada-sft-data``: chat or prompt/response data -> SFT records (input_ids, prompt_len).

Each record is the chat-templated prompt (BOS, history, generation prompt) followed by
the answer and ``<|eot_id|>``; ``prompt_len`` marks where the answer starts. An n-turn
dialogue gives n records (or one, picked at random with a seed per dialogue). Output
folder: ``tokens.bin`` (all records back to back), ``offsets.bin`` (int64, n+1),
``prompt_len.bin`` (int64, n) and ``manifest.json``.

Example (GSM8K): ``llada-sft-data --input gsm8k/train.jsonl --prompt-field question
--response-field answer --tokenizer tok/ --out runs/gsm8k/sft --max-length 512``
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.shards import remove_temp_files, write_array_atomic
from data_pipelines.sources import SourceSpec, add_input_arguments, describe_sources, iter_rows
from llada_train.atomic import write_json_atomic
from llada_train.data.chat import ChatEncoder, ChatTemplate, split_turns, validate_messages
from llada_train.data.tokenizer import (
    load_tokenizer,
    resolve_special_ids,
    tokenizer_fingerprint,
    vocab_size_of,
)
from llada_train.errors import LladaError, exit_on_error

FORMAT = "llada-sft-records"
CHUNK = 2048  # dialogues per batch-encode call


def _dialogue(row: dict[str, Any], where: str, a: argparse.Namespace) -> list[dict[str, str]]:
    """The row as a list of messages: chat rows as they are, pair rows as user + assistant."""
    if a.messages_field in row:
        return validate_messages(row[a.messages_field], where)
    if a.prompt_field in row and a.response_field in row:
        p, r = row[a.prompt_field], row[a.response_field]
        if not isinstance(p, str) or not isinstance(r, str):
            raise LladaError(
                f"{where}: fields {a.prompt_field!r}/{a.response_field!r} must be strings"
            )
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        return ([{"role": "system", "content": a.system}] if a.system else []) + msgs
    keys = ", ".join(sorted(map(str, row))[:10])
    raise LladaError(
        f"{where} has neither {a.messages_field!r} nor {a.prompt_field!r}+{a.response_field!r} (fields: {keys}): "
        "pass --messages-field or --prompt-field/--response-field"
    )


def build_records(a: argparse.Namespace) -> dict[str, Any]:
    """Build the record folder described by parsed CLI arguments; returns the manifest."""
    tok = load_tokenizer(a.tokenizer)
    special = resolve_special_ids(tok, a.tokenizer, a.eos_token, None)
    template = ChatTemplate(
        bos=a.bos_token, header_start=a.header_start, header_end=a.header_end, eot=a.eot_token
    )
    chat = ChatEncoder(tok, template)
    vocab = vocab_size_of(tok)
    dtype = np.dtype("uint16" if vocab <= 1 << 16 else "uint32")
    if a.max_length is not None and a.max_length < 2:
        raise LladaError(f"--max-length={a.max_length} is too small")
    spec = SourceSpec(
        inputs=a.input, dataset=a.dataset, dataset_config=a.dataset_config, split=a.split
    )
    stats = {
        "dialogues": 0,
        "pairs": 0,
        "records": 0,
        "dropped_too_long": 0,
        "truncated": 0,
        "no_assistant_turn": 0,
    }
    tokens: list[np.ndarray] = []
    lens: list[int] = []
    plens: list[int] = []

    def flush(batch: list[tuple[int, list[dict[str, str]]]]) -> None:
        segs: list = []
        for idx, msgs in batch:
            turns = split_turns(msgs)
            if not turns:
                stats["no_assistant_turn"] += 1
                continue
            if (
                a.turns == "random"
            ):  # one pair per dialogue, seeded by (seed, dialogue index): order-free
                k = int(np.random.default_rng([a.seed, idx]).integers(len(turns)))
                turns = [turns[k]]
            stats["pairs"] += len(turns)
            for history, answer in turns:
                segs += [chat.prompt_segments(history), chat.response_segments(answer)]
        ids = chat.encode(segs)
        for j in range(len(segs) // 2):
            prompt, response = ids[2 * j], ids[2 * j + 1]
            if a.max_length is not None and len(prompt) + len(response) > a.max_length:
                if a.overflow == "drop" or len(prompt) >= a.max_length:
                    stats["dropped_too_long"] += 1
                    continue
                response = response[: a.max_length - len(prompt)]
                stats["truncated"] += 1
            tokens.append(np.asarray(prompt + response, dtype=dtype))
            lens.append(len(prompt) + len(response))
            plens.append(len(prompt))

    batch: list[tuple[int, list[dict[str, str]]]] = []
    for where, row in iter_rows(spec):
        batch.append((stats["dialogues"], _dialogue(row, where, a)))
        stats["dialogues"] += 1
        if len(batch) >= CHUNK:
            flush(batch)
            batch = []
    flush(batch)
    stats["records"] = len(lens)
    if not lens:
        raise LladaError(
            f"no SFT records from {', '.join(a.input or [a.dataset or ''])}: every row was dropped or empty"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    (out / "manifest.json").unlink(
        missing_ok=True
    )  # the folder is valid only once the manifest is back
    offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    arrays = {
        "tokens": np.concatenate(tokens),
        "offsets": offsets,
        "prompt_len": np.asarray(plens, dtype=np.int64),
    }
    files = {}
    for name, arr in arrays.items():
        write_array_atomic(out / f"{name}.bin", arr)
        files[name] = {
            "file": f"{name}.bin",
            "dtype": arr.dtype.name,
            "num_items": len(arr),
            "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
        }
    manifest = {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer": str(a.tokenizer),
        "tokenizer_sha256": tokenizer_fingerprint(a.tokenizer),
        "eos_id": special.eos,
        "num_records": len(lens),
        "max_record_length": int(max(lens)),
        "num_tokens": int(offsets[-1]),
        "files": files,
        "stats": stats,
        "template": asdict(template),
        "turns": a.turns,
        "seed": a.seed,
        "max_length": a.max_length,
        "overflow": a.overflow,
        "sources": describe_sources(spec),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def build_arg_parser() -> argparse.ArgumentParser:
    """Arguments of ``llada-sft-data``."""
    ap = argparse.ArgumentParser(prog="llada-sft-data", description=__doc__.splitlines()[0])
    add_input_arguments(ap, ".jsonl/.parquet files, folders or save_to_disk folders")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a HF tokenizer folder")
    ap.add_argument("--out", required=True, help="output folder for the records")
    ap.add_argument(
        "--messages-field", default="messages", help="field with [{role, content}, ...]"
    )
    ap.add_argument(
        "--prompt-field", default="prompt", help="prompt field of pair records (GSM8K: question)"
    )
    ap.add_argument(
        "--response-field",
        default="response",
        help="response field of pair records (GSM8K: answer)",
    )
    ap.add_argument(
        "--system", default=None, help="system message put before each pair record's prompt"
    )
    ap.add_argument(
        "--turns",
        default="all",
        choices=["all", "random"],
        help="records per n-turn dialogue: all n, or one at random",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of --turns random")
    ap.add_argument("--max-length", type=int, default=None, help="longest record in tokens")
    ap.add_argument(
        "--overflow",
        default="drop",
        choices=["drop", "truncate"],
        help="what happens to longer records",
    )
    ap.add_argument("--eos-token", default=None, help="EOS (padding) token string")
    ap.add_argument("--bos-token", default=ChatTemplate.bos)
    ap.add_argument("--header-start", default=ChatTemplate.header_start)
    ap.add_argument("--header-end", default=ChatTemplate.header_end)
    ap.add_argument("--eot-token", default=ChatTemplate.eot)
    return ap


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """Console entry point ``llada-sft-data``."""
    a = build_arg_parser().parse_args(argv)
    if not a.input and not a.dataset:
        raise LladaError("no input: pass --input FILES or --dataset NAME")
    m = build_records(a)
    s = m["stats"]
    print(
        f"{a.out}: {s['records']:,} records from {s['dialogues']:,} dialogues ({s['pairs']:,} pairs; "
        f"dropped too long {s['dropped_too_long']}, truncated {s['truncated']}, "
        f"without assistant turn {s['no_assistant_turn']}); longest {m['max_record_length']} tokens"
    )


if __name__ == "__main__":
    main()
