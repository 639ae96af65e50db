"""Read and validate token-shard manifests: every problem is a one-line ``LladaError``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llada_train.data.tokenizer import file_sha256, tokenizer_fingerprint
from llada_train.errors import LladaError

DTYPES = ("uint16", "uint32")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path`` with a clear error when missing or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise LladaError(f"{p} not found: check the data path (run the tokenize/record step first)")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise LladaError(
            f"{p} is not valid JSON ({exc.msg} at line {exc.lineno}): regenerate it"
        ) from exc
    if not isinstance(obj, dict):
        raise LladaError(f"{p} is not a JSON object: regenerate it")
    return obj


def manifest_path(path: str | Path) -> Path:
    """``path/manifest.json`` for a folder, or ``path`` itself for a manifest file."""
    p = Path(path)
    return p / "manifest.json" if p.is_dir() or p.suffix != ".json" else p


def check_file(
    path: Path, expected_items: int, dtype: np.dtype, sha256: str | None, what: str
) -> None:
    """Raise unless ``path`` exists with exactly ``expected_items`` of ``dtype`` (and the checksum)."""
    if not path.is_file():
        raise LladaError(f"{what} {path} is missing: re-run the data step or fix the manifest")
    size, want = path.stat().st_size, expected_items * dtype.itemsize
    if size != want:
        raise LladaError(
            f"{what} {path} has {size} bytes, manifest says {want} ({expected_items} x {dtype.name}): "
            "the file is truncated or corrupted; re-run the data step"
        )
    if sha256 is not None and file_sha256(path) != sha256:
        raise LladaError(
            f"{what} {path} fails its sha256 checksum: the file is corrupted; re-run the data step"
        )


def load_shard_manifest(
    path: str | Path, verify_checksums: bool = False
) -> tuple[dict[str, Any], list[Path]]:
    """The manifest of a shard folder and its shard paths, after checking files against it."""
    mpath = manifest_path(path)
    if not mpath.is_file() and (mpath.parent / "progress.json").is_file():
        raise LladaError(
            f"{mpath.parent} holds an unfinished tokenization: run llada-tokenize again to finish it"
        )
    m = read_json(mpath)
    for key in ("dtype", "vocab_size", "shards"):
        if key not in m:
            raise LladaError(
                f"{mpath} has no {key!r}: not a llada-tokenize manifest; regenerate it"
            )
    if m["dtype"] not in DTYPES:
        raise LladaError(
            f"{mpath}: dtype {m['dtype']!r} is not one of {', '.join(DTYPES)}; regenerate the shards"
        )
    dtype = np.dtype(m["dtype"])
    if m["vocab_size"] > np.iinfo(dtype).max + 1:
        raise LladaError(
            f"{mpath}: vocab_size {m['vocab_size']} does not fit {dtype.name}; regenerate the shards"
        )
    if not m["shards"]:
        raise LladaError(f"{mpath} lists no shards: the input had no documents")
    paths = []
    for s in m["shards"]:
        p = mpath.parent / s["file"]
        check_file(
            p, int(s["num_tokens"]), dtype, s.get("sha256") if verify_checksums else None, "shard"
        )
        paths.append(p)
    return m, paths


def check_vocab(data_vocab_size: int, model_vocab_size: int, where: str) -> None:
    """Raise when token ids of the data (< ``data_vocab_size``) may not fit the model's embedding."""
    if data_vocab_size > model_vocab_size:
        raise LladaError(
            f"vocabulary mismatch {where}: the data's tokenizer has {data_vocab_size} ids but the model "
            f"embeds only {model_vocab_size}: use the tokenizer the model was built for, or set "
            f"model.vocab_size >= {data_vocab_size}"
        )


def check_tokenizer(manifest: dict[str, Any], tokenizer: str | None, where: str) -> None:
    """Raise when the configured tokenizer is not the one the data was tokenized with."""
    if not tokenizer or not manifest.get("tokenizer_sha256"):
        return
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer_sha256"]:
        raise LladaError(
            f"tokenizer mismatch {where}: {tokenizer} is not the tokenizer the data was made with "
            f"({manifest.get('tokenizer', 'see manifest')}): point data.tokenizer at that one, or re-tokenize"
        )
