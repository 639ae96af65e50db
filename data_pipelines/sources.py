"""Document sources for tokenization: .txt, .jsonl, .parquet, HF datasets (hub or saved to disk).

Every source yields documents in one fixed order, so a resumed run can skip exactly the
documents an earlier run already consumed.
"""

from __future__ import annotations

import argparse
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_train.data.jsonl import iter_jsonl_rows
from llada_train.errors import LladaError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass
class SourceSpec:
    """Where documents come from and how a document is cut out of a file."""

    inputs: list[str] = field(default_factory=list)  # files, folders, globs; or saved datasets
    dataset: str | None = None  # HF dataset name (or a save_to_disk folder)
    dataset_config: str | None = None
    split: str = "train"
    streaming: bool = False
    text_field: str = "text"
    txt_doc: str = "file"  # "file", "paragraph" (blank-line separated) or "line"


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``datasets`` ``save_to_disk``."""
    return path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files (sorted within each folder/glob) and saved-dataset folders, in argument order."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if is_saved_dataset(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise LladaError(
                    f"no .txt/.jsonl/.parquet files in folder {p}: check the --input path"
                )
            out += found
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise LladaError(f"input {item} not found: pass existing files, folders or a glob")
            out += matches
    return out


def describe_sources(spec: SourceSpec) -> list[dict[str, Any]]:
    """What the manifest records about the inputs (and what a resume checks did not change)."""
    rows: list[dict[str, Any]] = []
    for p in expand_inputs(spec.inputs):
        if p.is_dir():
            rows.append({"path": str(p.resolve()), "kind": "saved_dataset"})
        else:
            st = p.stat()
            rows.append(
                {
                    "path": str(p.resolve()),
                    "kind": p.suffix.lstrip("."),
                    "bytes": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                }
            )
    if spec.dataset:
        rows.append(
            {
                "dataset": spec.dataset,
                "config": spec.dataset_config,
                "split": spec.split,
                "kind": "hf_dataset",
            }
        )
    return rows


def _iter_txt(path: Path, mode: str) -> Iterator[str]:
    if mode == "file":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        if mode == "line":
            for line in f:
                yield line.rstrip("\n")
            return
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\n")
                para = []
        if para:
            yield "".join(para).rstrip("\n")


def _text_of(row: dict[str, Any], text_field: str, where: str) -> str:
    value = row.get(text_field)
    if not isinstance(value, str):
        keys = ", ".join(sorted(map(str, row))[:10])
        raise LladaError(
            f"no string field {text_field!r} in {where} (fields: {keys}): pass --text-field"
        )
    return value


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise LladaError(f"cannot read parquet file {path}: {exc}") from exc
    if text_field not in pf.schema_arrow.names:
        raise LladaError(
            f"no column {text_field!r} in {path} (columns: {', '.join(pf.schema_arrow.names)}): pass --text-field"
        )
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield value or ""


def _iter_dataset(ds, text_field: str, where: str) -> Iterator[str]:
    names = getattr(ds, "column_names", None)
    if names is not None and text_field not in names:
        raise LladaError(
            f"no column {text_field!r} in dataset {where} (columns: {', '.join(names)}): pass --text-field"
        )
    if hasattr(ds, "iter"):
        for batch in ds.iter(batch_size=1024):  # columnar batches: far faster than rows
            yield from (v or "" for v in batch[text_field])
    else:
        for row in ds:
            yield _text_of(row, text_field, f"dataset {where}")


def _load_saved(path: Path, split: str):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise LladaError(
                f"split {split!r} not in saved dataset {path} (splits: {', '.join(ds)}): pass --split"
            )
        ds = ds[split]
    return ds


def _load_hub(spec: SourceSpec):
    import datasets

    try:
        return datasets.load_dataset(
            spec.dataset, spec.dataset_config, split=spec.split, streaming=spec.streaming
        )
    except Exception as exc:
        raise LladaError(
            f"cannot load dataset {spec.dataset!r} (config {spec.dataset_config}, split {spec.split}): {exc}"
        ) from exc


def iter_documents(spec: SourceSpec) -> Iterator[str]:
    """All non-empty documents of all sources, in a fixed order."""
    if spec.txt_doc not in ("file", "paragraph", "line"):
        raise LladaError(f"--txt-doc {spec.txt_doc!r} is unknown: use file, paragraph or line")
    for path in expand_inputs(spec.inputs):
        if path.is_dir():
            docs: Iterator[str] = _iter_dataset(
                _load_saved(path, spec.split), spec.text_field, str(path)
            )
        elif path.suffix in (".jsonl", ".json"):
            docs = (
                _text_of(row, spec.text_field, f"{path} line {n}")
                for n, row in iter_jsonl_rows(path)
            )
        elif path.suffix == ".parquet":
            docs = _iter_parquet(path, spec.text_field)
        else:
            docs = _iter_txt(path, spec.txt_doc)
        yield from (d for d in docs if d.strip())
    if spec.dataset:
        p = Path(spec.dataset)
        ds = _load_saved(p, spec.split) if is_saved_dataset(p) else _load_hub(spec)
        yield from (d for d in _iter_dataset(ds, spec.text_field, spec.dataset) if d.strip())


def default_workers() -> int:
    """Worker processes to use by default: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def iter_rows(spec: SourceSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each row of jsonl/parquet files and datasets; ``where`` names file and line."""
    for path in expand_inputs(spec.inputs):
        if path.is_dir():
            ds = _load_saved(path, spec.split)
            for i, row in enumerate(ds):
                yield f"{path} row {i}", row
        elif path.suffix in (".jsonl", ".json"):
            for n, row in iter_jsonl_rows(path):
                yield f"{path} line {n}", row
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            i = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield f"{path} row {i}", row
                    i += 1
        else:
            raise LladaError(
                f"{path}: records need .jsonl, .parquet or a saved dataset, not {path.suffix or 'a plain file'}"
            )
    if spec.dataset:
        p = Path(spec.dataset)
        ds = _load_saved(p, spec.split) if is_saved_dataset(p) else _load_hub(spec)
        for i, row in enumerate(ds):
            yield f"dataset {spec.dataset} row {i}", row


def add_input_arguments(ap: argparse.ArgumentParser, input_help: str) -> None:
    """The input options the data CLIs share: local files or a ``datasets`` dataset."""
    ap.add_argument("--input", nargs="*", default=[], help=input_help)
    ap.add_argument("--dataset", help="HF datasets name (or a save_to_disk folder)")
    ap.add_argument("--dataset-config", help="datasets config name")
    ap.add_argument("--split", default="train")
