"""Pre-training reader: memory-mapped token shards cut into fixed windows of L tokens."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from llada_train.data.config import PretrainDataConfig, SourceConfig
from llada_train.data.heldout import ValidationSource, ValItem, carve_count
from llada_train.data.manifest import check_tokenizer, check_vocab, load_shard_manifest
from llada_train.data.stream import ReaderInfo, StreamReader
from llada_train.errors import LladaError

# Tokens gathered per vectorised read: large enough to amortise Python overhead on short
# windows and to gather per shard, small enough (2 MB of int64) that freed blocks get reused.
CHUNK_TOKENS = 1 << 18


class ShardWindows:
    """One shard set viewed as a concatenated token stream cut into ``num_windows`` windows.

    Window w is stream tokens [w*L, (w+1)*L); it may span two shards. The tail shorter
    than L is never read. Memory maps open lazily, so the object pickles cheaply into
    dataloader workers. With ``vocab_size`` set, every read checks its ids are below it.
    """

    def __init__(
        self,
        paths: list[Path],
        num_tokens: list[int],
        dtype: str,
        seq_len: int,
        vocab_size: int | None = None,
    ) -> None:
        self.paths, self.dtype, self.L = [str(p) for p in paths], np.dtype(dtype), seq_len
        self.vocab = vocab_size
        self.starts = np.concatenate([[0], np.cumsum(num_tokens, dtype=np.int64)])  # (n_shards+1,)
        self.num_windows = int(self.starts[-1]) // seq_len
        self._maps: list[np.ndarray] | None = None
        self._views: list[tuple[int, np.ndarray]] = []
        self._scratch = np.empty((0, seq_len), dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_views": []}

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            # plain ndarray views of the maps: slicing a np.memmap costs ~10x more per call
            self._maps = [
                np.memmap(p, dtype=self.dtype, mode="r").view(np.ndarray) for p in self.paths
            ]
            self._views = [self._window_view(k) for k in range(len(self._maps))]
        return self._maps

    def _window_view(self, k: int) -> tuple[int, np.ndarray]:
        """Shard k as a (windows fully inside it, L) strided view, and the view's first stream offset."""
        arr, L = self._maps[k], self.L
        skip = int(-self.starts[k] % L)  # windows start at multiples of L in the stream
        n = max(0, (len(arr) - skip) // L)
        view = np.lib.stride_tricks.as_strided(
            arr[skip:], shape=(n, L), strides=(L * arr.itemsize, arr.itemsize)
        )
        return int(self.starts[k]) + skip, view

    def read(self, windows: np.ndarray) -> np.ndarray:
        """Tokens of ``windows`` (n,) as an (n, L) array of the shard dtype.

        Gathering in the narrow dtype and widening the whole block at once afterwards is
        ~2x faster than widening row by row. The result is a reused buffer, valid until the
        next call.
        """
        maps, L = self._open(), self.L
        if self._scratch.shape[0] != len(windows):  # reused: the caller widens it into a new array
            self._scratch = np.empty((len(windows), L), dtype=self.dtype)
        out = self._scratch  # (n, L)
        begin = windows.astype(np.int64) * L  # (n,) stream offset of each window
        shard = np.searchsorted(self.starts, begin, side="right") - 1  # (n,)
        inside = begin + L <= self.starts[shard + 1]  # (n,) window lies in one shard
        groups = np.unique(shard[inside])
        if len(groups) * 4 <= len(windows):  # few shards touched: one fancy-index gather per shard
            for k in groups.tolist():
                rows = np.flatnonzero(inside & (shard == k))
                first, view = self._views[k]
                out[rows] = view[(begin[rows] - first) // L]
            todo = np.flatnonzero(~inside).tolist()
        else:
            todo = range(len(windows))
        for row in todo:  # row by row: windows spanning shards, or spread over many shards
            s = int(shard[row])
            off, filled = int(begin[row] - self.starts[s]), 0
            while filled < L:
                take = min(L - filled, len(maps[s]) - off)
                out[row, filled : filled + take] = maps[s][off : off + take]
                filled, s, off = filled + take, s + 1, 0
        # a corrupt shard (checksums off) would otherwise die in the embedding with an
        # IndexError naming nothing; one max over the block: ~0.1 ms per 256k tokens
        if self.vocab is not None and out.size and int(out.max()) >= self.vocab:
            self._bad_token(out, begin)
        return out

    def _bad_token(self, out: np.ndarray, begin: np.ndarray) -> NoReturn:
        """Raise naming the shard file and token offset of the first id >= the vocabulary."""
        row, col = (int(i) for i in np.argwhere(out >= self.vocab)[0])
        pos = int(begin[row]) + col  # stream offset of the bad token
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        raise LladaError(
            f"shard {self.paths[k]} holds token id {int(out[row, col])} at token offset "
            f"{pos - int(self.starts[k])}, outside the model's vocabulary of {self.vocab} ids: "
            "the shard is corrupt; re-tokenize it (data.verify_checksums=true checks every "
            "shard at start)"
        )


def document_ids(x: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, L) int64 document index of each token: a new id starts after each EOS.

    The EOS belongs to the document it ends, so that document still learns to stop.
    """
    eos = (x == eos_token_id).long()  # (B, L)
    return eos.cumsum(dim=1) - eos


class PretrainData:
    """Sources of a mixture and the batch fetch used by the stream reader.

    ``eos_token_id`` set: each batch also carries ``document_ids`` (document-masked packing).
    """

    def __init__(
        self, sources: list[ShardWindows], seq_len: int, eos_token_id: int | None = None
    ) -> None:
        self.sources, self.L, self.eos = sources, seq_len, eos_token_id

    def __call__(self, src: np.ndarray, items: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        """Batches for ``items`` (g, B) of sources ``src`` (g, B): g dicts of input_ids (B, L).

        A generator reading one chunk at a time: holding a whole plan's batches would make
        every plan allocate (and page-fault) fresh memory instead of reusing freed blocks.
        """
        g, B = items.shape
        per = max(1, CHUNK_TOKENS // (B * self.L))  # steps gathered together
        for a in range(0, g, per):
            s_chunk, i_chunk = src[a : a + per].reshape(-1), items[a : a + per].reshape(-1)
            block = self._gather(s_chunk, i_chunk)  # (n*B, L)
            for x in torch.from_numpy(block).view(-1, B, self.L):  # (B, L) views of the block
                if self.eos is None:
                    yield {"input_ids": x}
                else:
                    yield {"input_ids": x, "document_ids": document_ids(x, self.eos)}

    def _gather(self, src: np.ndarray, items: np.ndarray) -> np.ndarray:
        if len(self.sources) == 1:
            return self.sources[0].read(items).astype(np.int64)  # (n, L)
        out = np.empty((len(items), self.L), dtype=np.int64)  # (n, L)
        for s in np.unique(src).tolist():
            sel = np.flatnonzero(src == s)
            out[sel] = self.sources[s].read(items[sel])
        return out


def _source_list(cfg: PretrainDataConfig) -> list[SourceConfig]:
    if cfg.sources:
        return list(cfg.sources)
    if not cfg.path:
        raise LladaError("data config: set data.path (a shard folder) or data.sources (a mixture)")
    return [SourceConfig(path=cfg.path, weight=1.0)]


def _source_manifest(
    path: str, cfg: PretrainDataConfig, vocab_size: int | None, verify_checksums: bool
) -> tuple[dict, list[Path]]:
    """A source's checked manifest and shard paths: files, tokenizer, vocabulary."""
    m, paths = load_shard_manifest(path, verify_checksums)
    check_tokenizer(m, cfg.tokenizer, f"in data source {path}")
    if vocab_size is not None:
        check_vocab(int(m["vocab_size"]), vocab_size, f"in data source {path}")
    return m, paths


def check_pretrain_data(cfg: PretrainDataConfig, vocab_size: int) -> None:
    """The reader's manifest checks without opening a shard (sizes only, no checksums): run
    before any process group, so a wrong path, tokenizer or vocabulary costs seconds."""
    for path in [sc.path for sc in _source_list(cfg)] + ([cfg.val_path] if cfg.val_path else []):
        _source_manifest(path, cfg, vocab_size, verify_checksums=False)


def _open_windows(
    path: str, cfg: PretrainDataConfig, seq_len: int, vocab_size: int | None
) -> tuple[ShardWindows, dict]:
    m, paths = _source_manifest(path, cfg, vocab_size, cfg.verify_checksums)
    sizes = [int(s["num_tokens"]) for s in m["shards"]]
    w = ShardWindows(paths, sizes, m["dtype"], seq_len, vocab_size)
    if w.num_windows == 0:
        raise LladaError(
            f"data source {path} has {m.get('num_tokens', 0)} tokens, fewer than seq_len={seq_len}: "
            "use more data or a shorter sequence"
        )
    return w, m


def _validation(
    cfg: PretrainDataConfig,
    windows: list[ShardWindows],
    held: list[int],
    seq_len: int,
    vocab_size: int | None,
) -> ValidationSource | None:
    """Validation windows: all of ``data.val_path``, or the last ``held[s]`` of each source."""
    if cfg.val_path:
        w, _ = _open_windows(cfg.val_path, cfg, seq_len, vocab_size)
        pairs = np.stack([np.zeros(w.num_windows, np.int64), np.arange(w.num_windows)], axis=1)
        sources, where = [w], cfg.val_path
    elif sum(held):
        pairs = np.concatenate([
            np.stack([np.full(n, s), np.arange(w.num_windows - n, w.num_windows)], axis=1)
            for s, (w, n) in enumerate(zip(windows, held, strict=True)) if n
        ]).astype(np.int64)  # (pool, 2): (source, window)
        sources, where = windows, "the last windows of each training source"
    else:
        return None

    def read(idx: np.ndarray) -> list[ValItem]:
        return [(sources[s].read(np.array([w]))[0].astype(np.int64), 0) for s, w in pairs[idx]]

    return ValidationSource(len(pairs), read, where)


def build_pretrain_reader(
    cfg: PretrainDataConfig,
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    eos_token_id: int | None = None,
    vocab_size: int | None = None,
) -> tuple[StreamReader, ReaderInfo]:
    """Reader whose ``next()`` gives ``{"input_ids": LongTensor (B, L)}`` forever, and its info.

    The info's ``vocab_size`` is the largest of the sources'; ``manifests`` has one per source;
    ``validation`` the held-out windows (``data.val_path`` / ``data.val_fraction``), which the
    reader never returns. ``data.document_mask`` adds ``document_ids`` (B, L), which needs
    ``eos_token_id``. ``vocab_size`` (the model's): a window holding a larger id is refused.
    """
    if seq_len <= 0:
        raise LladaError(f"seq_len={seq_len} must be positive")
    if cfg.document_mask and eos_token_id is None:
        raise LladaError("data.document_mask=true needs the model's eos_token_id to find documents")
    windows, manifests, fingerprints, held = [], [], [], []
    for sc in _source_list(cfg):
        w, m = _open_windows(sc.path, cfg, seq_len, vocab_size)
        frac = 0.0 if cfg.val_path else cfg.val_fraction
        held.append(carve_count(w.num_windows, frac, f"data source {sc.path}"))
        windows.append(w)
        manifests.append(m)
        # one digest per source keeps the saved state small even with 100k shards
        shas = json.dumps([[s["file"], s["num_tokens"], s.get("sha256")] for s in m["shards"]])
        fingerprints.append(hashlib.sha256(shas.encode()).hexdigest())
    tok_ids = {m.get("tokenizer_sha256") for m in manifests}
    if len(tok_ids) > 1:
        raise LladaError(
            "data sources were tokenized with different tokenizers: re-tokenize them with one"
        )
    reader = StreamReader(
        PretrainData(windows, seq_len, eos_token_id if cfg.document_mask else None),
        # the held-out tail windows lie past the sizes the reader walks: training never sees them
        sizes=[w.num_windows - n for w, n in zip(windows, held, strict=True)],
        weights=[sc.weight for sc in _source_list(cfg)],
        batch=micro_batch_size,
        seed=seed,
        rank=rank,
        world=world_size,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor,
        identity={"kind": "pretrain", "seq_len": seq_len, "shards": fingerprints},
    )
    info = ReaderInfo(
        vocab_size=max(int(m["vocab_size"]) for m in manifests),
        manifests=manifests,
        validation=_validation(cfg, windows, held, seq_len, vocab_size),
    )
    return reader, info
