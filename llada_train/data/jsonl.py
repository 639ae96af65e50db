"""Read JSON-lines files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llada_train.errors import LladaError


def iter_jsonl_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; malformed lines name the file and line."""
    path = Path(path)
    if not path.exists():
        raise LladaError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LladaError(
                    f"malformed JSON in {path} line {lineno}: {exc.msg}; fix or remove that line"
                ) from exc
            if not isinstance(row, dict):
                raise LladaError(
                    f"{path} line {lineno} is not a JSON object: each line must be {{...}}"
                )
            yield lineno, row
