"""Helpers shared by the data tests: demo folder, hand-made shard sets, subprocess runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SHARED_DATA


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.is_file():
        pytest.skip(f"../shared/data not present: {p} missing")
    return p


def run_py(
    args: list[str], env: dict[str, str] | None = None, check: bool = True, timeout: int = 120
):
    """Run ``python ARGS`` from the repo root with the repo importable; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    res = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def write_shard_set(
    folder: Path, shards: list[np.ndarray], vocab_size: int, dtype: str = "uint32"
) -> Path:
    """A shard folder in the llada-tokenize layout, written by hand (independent of the pipeline)."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, arr in enumerate(shards):
        arr = np.asarray(arr, dtype=dtype)
        name = f"shard_{k:05d}.bin"
        (folder / name).write_bytes(arr.tobytes())
        rows.append(
            {
                "file": name,
                "num_tokens": len(arr),
                "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
            }
        )
    manifest = {
        "format": "llada-token-shards",
        "version": 1,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "tokenizer_sha256": None,
        "eos_id": 1,
        "bos_id": 0,
        "shards": rows,
        "num_tokens": sum(r["num_tokens"] for r in rows),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def counting_shards(folder: Path, sizes: list[int], offset: int = 0) -> Path:
    """Shards whose concatenation is ``offset + arange(sum(sizes))``: a window's first token names it."""
    stream = np.arange(offset, offset + sum(sizes))
    cuts = np.cumsum(sizes)[:-1]
    return write_shard_set(folder, np.split(stream, cuts), vocab_size=int(offset + sum(sizes)))




