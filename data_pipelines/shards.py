"""Cut a token stream into fixed-size shard files; record progress so a killed run resumes exactly.

The stream is every document's tokens followed by EOS (BOS first when asked). Shard k
holds stream tokens [k*S, (k+1)*S). After each shard is on disk, ``progress.json`` records
the document and the token offset inside it where the next shard starts; a resumed run
skips to that document, re-encodes it and drops that many tokens, so its shards are
byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from llada_train.atomic import write_bytes_atomic, write_json_atomic

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT = "llada-token-shards"


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard_{k:05d}.bin"


def write_array_atomic(path: Path, arr: np.ndarray) -> None:
    """Write a flat array's bytes under a temp name, then rename: a shard only appears complete."""
    write_bytes_atomic(path, np.ascontiguousarray(arr).tobytes())


def remove_temp_files(out: Path) -> None:
    """Drop temp files a killed run left behind (they are never complete shards)."""
    for f in out.glob("*.tmp-*"):
        f.unlink(missing_ok=True)


class ShardPacker:
    """Accumulates encoded documents and writes full shards; tracks where each shard ends.

    ``next_doc``/``offset`` always describe the first unwritten token: document index in
    the source order and position inside that document's stream tokens.
    """

    def __init__(
        self, out: Path, shard_tokens: int, dtype: np.dtype, progress: dict[str, Any]
    ) -> None:
        self.out, self.S, self.dtype = out, shard_tokens, np.dtype(dtype)
        self.progress = progress
        self.shards: list[dict[str, Any]] = progress["shards"]
        self.written = sum(s["num_tokens"] for s in self.shards)  # stream tokens already in shards
        self.next_doc: int = progress["next_doc"]
        self.skip = progress["offset"]  # tokens of the first incoming document already written
        self.cur_start = self.written - self.skip  # stream position where document next_doc starts
        self.first_start = self.cur_start  # stream position where the next added document starts
        self.pieces: list[np.ndarray] = []
        self.buffered = 0
        self.ends: list[np.ndarray] = []  # stream end position of each buffered document

    def add(self, stream: np.ndarray, doc_lens: np.ndarray, on_shard=None) -> None:
        """Append one chunk: ``stream`` (tokens of its documents, EOS included), ``doc_lens`` per document."""
        ends = self.first_start + np.cumsum(doc_lens, dtype=np.int64)
        self.first_start = int(ends[-1])
        self.ends.append(ends)
        if self.skip:
            stream = stream[self.skip :]
            self.skip = 0
        self.pieces.append(stream)
        self.buffered += len(stream)
        if self.buffered < self.S:
            return
        buf = np.concatenate(self.pieces)  # once per shard's worth of tokens, not per shard
        a = 0
        while len(buf) - a >= self.S:
            self._write(buf[a : a + self.S], on_shard)
            a += self.S
        self.pieces, self.buffered = ([buf[a:]] if a < len(buf) else []), len(buf) - a

    def finish(self, on_shard=None) -> None:
        """Write the last, shorter shard (if any tokens remain)."""
        if self.buffered:
            self._write(np.concatenate(self.pieces), on_shard)
            self.pieces, self.buffered = [], 0

    def _write(self, tokens: np.ndarray, on_shard) -> None:
        """Write the next shard, then record in progress.json where the stream continues."""
        n = len(tokens)
        shard = tokens.astype(self.dtype, copy=False)
        k = len(self.shards)
        path = self.out / shard_name(k)
        write_array_atomic(path, shard)
        if on_shard is not None:
            on_shard(k)  # test hook: a crash here leaves a shard the progress file does not know
        self.written += n
        ends = np.concatenate(self.ends)
        done = int(np.searchsorted(ends, self.written, side="right"))  # documents fully written
        if done:
            self.cur_start = int(ends[done - 1])
        self.next_doc += done
        self.ends = [ends[done:]] if done < len(ends) else []
        digest = hashlib.sha256(np.ascontiguousarray(shard).tobytes()).hexdigest()
        self.shards.append({"file": path.name, "num_tokens": int(n), "sha256": digest})
        self.progress.update(next_doc=self.next_doc, offset=self.written - self.cur_start)
        write_json_atomic(self.out / PROGRESS, self.progress)
