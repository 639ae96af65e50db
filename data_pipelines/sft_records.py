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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.shards import remove_temp_files, write_array_atomic
from data_pipelines.sources import SourceSpec, add_input_arguments, describe_sources, iter_rows
from llada_train.atomic import write_json_atomic
from llada_train.chat import ChatEncoder, ChatTemplate, split_turns, validate_messages
from llada_train.data.tokenizer import (
    load_tokenizer,
    resolve_special_ids,
    tokenizer_fingerprint,
    vocab_size_of,
)
from llada_train.errors import LladaError, exit_on_error

FORMAT = "llada-sft-records"
CHUNK = 2048  # dialogues per batch-encode call


@dataclass
class RecordSpec:
    """How rows become SFT records (the flags of ``llada-sft-data`` beside input and output)."""

    messages_field: str = "messages"  # field with [{role, content}, ...]
    prompt_field: str = "prompt"  # pair records (GSM8K: question)
    response_field: str = "response"  # pair records (GSM8K: answer)
    system: str | None = None  # system message put before each pair record's prompt
    turns: str = "all"  # records per n-turn dialogue: "all" n, or one at "random"
    seed: int = 0  # seed of turns="random"
    max_length: int | None = None  # longest record in tokens
    overflow: str = "drop"  # longer records: "drop" or "truncate"
    eos_token: str | None = None  # EOS (padding) token string; default from the tokenizer
    template: ChatTemplate = field(default_factory=ChatTemplate)


TURNS = ("all", "random")
OVERFLOW = ("drop", "truncate")


def _dialogue(row: dict[str, Any], where: str, spec: RecordSpec) -> list[dict[str, str]]:
    """The row as a list of messages: chat rows as they are, pair rows as user + assistant."""
    if spec.messages_field in row:
        return validate_messages(row[spec.messages_field], where)
    if spec.prompt_field in row and spec.response_field in row:
        p, r = row[spec.prompt_field], row[spec.response_field]
        if not isinstance(p, str) or not isinstance(r, str):
            raise LladaError(
                f"{where}: fields {spec.prompt_field!r}/{spec.response_field!r} must be strings"
            )
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        return ([{"role": "system", "content": spec.system}] if spec.system else []) + msgs
    keys = ", ".join(sorted(map(str, row))[:10])
    raise LladaError(
        f"{where} has neither {spec.messages_field!r} nor "
        f"{spec.prompt_field!r}+{spec.response_field!r} (fields: {keys}): "
        "pass --messages-field or --prompt-field/--response-field"
    )


def build_records(
    source: SourceSpec, tokenizer: str | Path, out: str | Path, spec: RecordSpec | None = None
) -> dict[str, Any]:
    """Build the SFT record folder ``out`` from the rows of ``source``; returns the manifest."""
    spec = spec or RecordSpec()
    if not source.inputs and not source.dataset:
        raise LladaError("no input: pass --input FILES or --dataset NAME")
    if spec.turns not in TURNS or spec.overflow not in OVERFLOW:
        raise LladaError(
            f"turns={spec.turns!r} / overflow={spec.overflow!r}: "
            f"use turns in {TURNS}, overflow in {OVERFLOW}"
        )
    if spec.max_length is not None and spec.max_length < 2:
        raise LladaError(f"--max-length={spec.max_length} is too small")
    tok = load_tokenizer(tokenizer)
    special = resolve_special_ids(tok, tokenizer, spec.eos_token, None)
    chat = ChatEncoder(tok, spec.template)
    vocab = vocab_size_of(tok)
    dtype = np.dtype("uint16" if vocab <= 1 << 16 else "uint32")
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
                spec.turns == "random"
            ):  # one pair per dialogue, seeded by (seed, dialogue index): order-free
                k = int(np.random.default_rng([spec.seed, idx]).integers(len(turns)))
                turns = [turns[k]]
            stats["pairs"] += len(turns)
            for history, answer in turns:
                segs += [chat.prompt_segments(history), chat.response_segments(answer)]
        ids = chat.encode(segs)
        for j in range(len(segs) // 2):
            prompt, response = ids[2 * j], ids[2 * j + 1]
            if spec.max_length is not None and len(prompt) + len(response) > spec.max_length:
                if spec.overflow == "drop" or len(prompt) >= spec.max_length:
                    stats["dropped_too_long"] += 1
                    continue
                response = response[: spec.max_length - len(prompt)]
                stats["truncated"] += 1
            tokens.append(np.asarray(prompt + response, dtype=dtype))
            lens.append(len(prompt) + len(response))
            plens.append(len(prompt))

    batch: list[tuple[int, list[dict[str, str]]]] = []
    for where, row in iter_rows(source):
        batch.append((stats["dialogues"], _dialogue(row, where, spec)))
        stats["dialogues"] += 1
        if len(batch) >= CHUNK:
            flush(batch)
            batch = []
    flush(batch)
    stats["records"] = len(lens)
    if not lens:
        raise LladaError(
            f"no SFT records from {', '.join(source.inputs or [source.dataset or ''])}: "
            "every row was dropped or empty"
        )
    out = Path(out)
    files, offsets = write_record_files(out, tokens, plens)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer": str(tokenizer),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "eos_id": special.eos,
        "num_records": len(lens),
        "max_record_length": int(max(lens)),
        "num_tokens": int(offsets[-1]),
        "files": files,
        "stats": stats,
        "template": asdict(spec.template),
        "turns": spec.turns,
        "seed": spec.seed,
        "max_length": spec.max_length,
        "overflow": spec.overflow,
        "sources": describe_sources(source),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def add_template_arguments(ap: argparse.ArgumentParser) -> None:
    """The chat template's tokens and the EOS, shared by the record builders."""
    ap.add_argument("--eos-token", default=None, help="EOS (padding) token string")
    ap.add_argument("--bos-token", default=ChatTemplate.bos)
    ap.add_argument("--header-start", default=ChatTemplate.header_start)
    ap.add_argument("--header-end", default=ChatTemplate.header_end)
    ap.add_argument("--eot-token", default=ChatTemplate.eot)


def template_from_args(a: argparse.Namespace) -> ChatTemplate:
    """The ChatTemplate of :func:`add_template_arguments`' flags."""
    return ChatTemplate(
        bos=a.bos_token, header_start=a.header_start, header_end=a.header_end, eot=a.eot_token
    )


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
    add_template_arguments(ap)
    return ap


def specs_from_args(a: argparse.Namespace) -> tuple[SourceSpec, str, str, RecordSpec]:
    """``build_records`` arguments (source, tokenizer, out, spec) from parsed CLI flags."""
    source = SourceSpec(
        inputs=a.input, dataset=a.dataset, dataset_config=a.dataset_config, split=a.split
    )
    template = template_from_args(a)
    # every RecordSpec field but the template is a flag of the same name
    flags = {f.name: getattr(a, f.name) for f in fields(RecordSpec) if f.name != "template"}
    spec = RecordSpec(**flags, template=template)
    return source, a.tokenizer, a.out, spec


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """Console entry point ``llada-sft-data``."""
    a = build_arg_parser().parse_args(argv)
    m = build_records(*specs_from_args(a))
    s = m["stats"]
    print(
        f"{a.out}: {s['records']:,} records from {s['dialogues']:,} dialogues ({s['pairs']:,} pairs; "
        f"dropped too long {s['dropped_too_long']}, truncated {s['truncated']}, "
        f"without assistant turn {s['no_assistant_turn']}); longest {m['max_record_length']} tokens"
    )



def write_record_files(
    out: Path, records: list[np.ndarray], plens: list[int]
) -> tuple[dict[str, Any], np.ndarray]:
    """Write ``tokens``/``offsets``/``prompt_len`` .bin files into ``out`` (atomic, hashed) after
    removing its manifest (the folder is valid only once a manifest is back); returns the
    manifest's ``files`` entry and the offsets. Shared by SFT records and preference pairs."""
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    (out / "manifest.json").unlink(missing_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in records], dtype=np.int64)])
    arrays = {
        "tokens": np.concatenate(records),
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
    return files, offsets


if __name__ == "__main__":
    main()
