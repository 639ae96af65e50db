"""``llada-preference-data``: preference rows -> records for VRPO (``llada-dpo``).

A row holds the prompt (``prompt``: a string, or ``messages``: the dialogue so far) and two
answers, ``chosen`` and ``rejected``: strings, or message lists whose last message is the
assistant's (then, without a prompt field, the messages before it are the prompt: the layout
of HuggingFaceH4/ultrafeedback_binarized). Each pair becomes two records rendered with
``llada-sft-data``'s chat template: prompt + chosen + ``<|eot_id|>`` and prompt + rejected +
``<|eot_id|>``. A pair longer than ``--max-length`` is dropped (truncating an answer could
flip the preference); a pair whose answers are identical is dropped, counted and warned about.

Output folder: ``tokens.bin`` (records back to back: pair i is records 2i and 2i + 1),
``offsets.bin`` (int64, 2n + 1), ``prompt_len.bin`` (int64, n), ``manifest.json``.

Example: ``llada-preference-data --input prefs.jsonl --tokenizer tok/ --out runs/prefs
--max-length 1024``
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.sft_records import (
    add_template_arguments,
    template_from_args,
    write_record_files,
)
from data_pipelines.sources import SourceSpec, add_input_arguments, describe_sources, iter_rows
from llada_train.atomic import write_json_atomic
from llada_train.chat import ChatEncoder, ChatTemplate, validate_messages
from llada_train.data.tokenizer import (
    load_tokenizer,
    resolve_special_ids,
    tokenizer_fingerprint,
    vocab_size_of,
)
from llada_train.errors import LladaError, exit_on_error

FORMAT = "llada-preference-records"


@dataclass
class PreferenceSpec:
    """How rows become preference records (the flags beside input, tokenizer and output)."""

    prompt_field: str = "prompt"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    system: str | None = None  # system message put before a string prompt
    max_length: int | None = None  # longest record (prompt + answer) in tokens
    eos_token: str | None = None
    template: ChatTemplate = field(default_factory=ChatTemplate)


def _answer(row: dict[str, Any], key: str, where: str) -> tuple[str, list[dict[str, str]] | None]:
    """(answer text, the messages before it when the answer is a message list)."""
    if key not in row or row[key] is None:
        raise LladaError(
            f"{where}: the preference record has no {key!r} answer (fields: "
            f"{', '.join(sorted(map(str, row))[:10])}): give both chosen and rejected, or "
            f"name them with --chosen-field/--rejected-field"
        )
    value = row[key]
    if isinstance(value, str):
        return value, None
    msgs = validate_messages(value, f"{where} ({key})")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise LladaError(
            f"{where}: {key!r} is a message list whose last message is not the "
            "assistant's: end it with the answer"
        )
    return msgs[-1]["content"], msgs[:-1]


def pair_of(
    row: dict[str, Any], where: str, spec: PreferenceSpec
) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen text, rejected text) of one row."""
    chosen, history = _answer(row, spec.chosen_field, where)
    rejected, _ = _answer(row, spec.rejected_field, where)
    if spec.messages_field in row:
        prompt = validate_messages(row[spec.messages_field], where)
    elif spec.prompt_field in row:
        if not isinstance(row[spec.prompt_field], str):
            raise LladaError(f"{where}: field {spec.prompt_field!r} must be a string")
        prompt = [{"role": "user", "content": row[spec.prompt_field]}]
        prompt = ([{"role": "system", "content": spec.system}] if spec.system else []) + prompt
    elif history:
        prompt = history
    else:
        raise LladaError(
            f"{where} has no prompt: give {spec.prompt_field!r} or {spec.messages_field!r} "
            "(or chosen/rejected as message lists that start with the prompt)"
        )
    return prompt, chosen, rejected


def build_preference_records(
    source: SourceSpec, tokenizer: str | Path, out: str | Path, spec: PreferenceSpec | None = None
) -> dict[str, Any]:
    """Build the preference record folder ``out`` from ``source``'s rows; returns the manifest."""
    spec = spec or PreferenceSpec()
    if not source.inputs and not source.dataset:
        raise LladaError("no input: pass --input FILES or --dataset NAME")
    if spec.max_length is not None and spec.max_length < 2:
        raise LladaError(f"--max-length={spec.max_length} is too small")
    tok = load_tokenizer(tokenizer)
    special = resolve_special_ids(tok, tokenizer, spec.eos_token, None)
    chat = ChatEncoder(tok, spec.template)
    vocab = vocab_size_of(tok)
    dtype = np.dtype("uint16" if vocab <= 1 << 16 else "uint32")
    stats: dict[str, Any] = {
        "rows": 0,
        "pairs": 0,
        "dropped_too_long": 0,
        "dropped_identical": 0,
        "first_identical": None,
    }
    records: list[np.ndarray] = []
    plens: list[int] = []
    for where, row in iter_rows(source):
        stats["rows"] += 1
        prompt, chosen, rejected = pair_of(row, where, spec)
        if chosen == rejected:
            stats["dropped_identical"] += 1
            stats["first_identical"] = stats["first_identical"] or where
            continue
        p_ids, c_ids, r_ids = chat.encode(
            [
                chat.prompt_segments(prompt),
                chat.response_segments(chosen),
                chat.response_segments(rejected),
            ]
        )
        if (
            spec.max_length is not None
            and len(p_ids) + max(len(c_ids), len(r_ids)) > spec.max_length
        ):
            stats["dropped_too_long"] += 1
            continue
        records += [np.asarray(p_ids + c_ids, dtype=dtype), np.asarray(p_ids + r_ids, dtype=dtype)]
        plens.append(len(p_ids))
    stats["pairs"] = len(plens)
    if stats["dropped_identical"]:
        print(
            f"warning: {stats['dropped_identical']} pairs have chosen identical to rejected "
            f"(first at {stats['first_identical']}); dropped",
            file=sys.stderr,
            flush=True,
        )
    if not plens:
        raise LladaError(
            f"no preference pairs from {', '.join(source.inputs or [source.dataset or ''])}: "
            "every row was dropped (too long or identical answers)"
        )
    return _write(
        Path(out),
        records,
        plens,
        dtype,
        {
            "vocab_size": vocab,
            "tokenizer": str(tokenizer),
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "eos_id": special.eos,
            "stats": stats,
            "template": asdict(spec.template),
            "max_length": spec.max_length,
            "sources": describe_sources(source),
        },
    )


def _write(
    out: Path, records: list[np.ndarray], plens: list[int], dtype: np.dtype, meta: dict[str, Any]
) -> dict[str, Any]:
    files, _ = write_record_files(out, records, plens)
    lengths = [len(r) for r in records]
    manifest = {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype.name,
        "num_pairs": len(plens),
        "max_record_length": int(max(lengths)),
        "files": files,
        **meta,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def build_arg_parser() -> argparse.ArgumentParser:
    """Arguments of ``llada-preference-data``."""
    ap = argparse.ArgumentParser(prog="llada-preference-data", description=__doc__.splitlines()[0])
    add_input_arguments(ap, ".jsonl/.parquet files, folders or save_to_disk folders")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json or a HF tokenizer folder")
    ap.add_argument("--out", required=True, help="output folder for the records")
    for name in ("prompt", "messages", "chosen", "rejected"):
        ap.add_argument(f"--{name}-field", default=name, help=f"field of the {name}")
    ap.add_argument("--system", default=None, help="system message before a string prompt")
    ap.add_argument("--max-length", type=int, default=None, help="longest record in tokens")
    add_template_arguments(ap)
    return ap


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """Console entry point ``llada-preference-data``."""
    a = build_arg_parser().parse_args(argv)
    source = SourceSpec(
        inputs=a.input, dataset=a.dataset, dataset_config=a.dataset_config, split=a.split
    )
    template = template_from_args(a)
    spec = PreferenceSpec(
        a.prompt_field,
        a.messages_field,
        a.chosen_field,
        a.rejected_field,
        a.system,
        a.max_length,
        a.eos_token,
        template,
    )
    m = build_preference_records(source, a.tokenizer, a.out, spec)
    s = m["stats"]
    print(
        f"{a.out}: {s['pairs']:,} pairs from {s['rows']:,} rows (dropped too long "
        f"{s['dropped_too_long']}, identical answers {s['dropped_identical']}); longest record "
        f"{m['max_record_length']} tokens"
    )


if __name__ == "__main__":
    main()
