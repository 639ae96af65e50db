"""SFT reader: memory-mapped records, shuffled by seed/epoch, padded with EOS per batch.

The EOS padding is part of the response (SPEC §3): the collator only pads; the SFT
objective masks and scores the padding like any response token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llada_train.data.config import SFTDataConfig
from llada_train.data.heldout import ValidationSource, ValItem, carve_count
from llada_train.data.manifest import (
    check_file,
    check_tokenizer,
    check_vocab,
    manifest_path,
    read_json,
)
from llada_train.data.stream import ReaderInfo, StreamReader
from llada_train.errors import LladaError


def collate_sft(
    seqs: list[np.ndarray],
    prompt_lens: list[int],
    eos_id: int,
    multiple_of: int = 1,
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad records with ``eos_id`` to the longest (rounded up to ``multiple_of``), or to ``length``."""
    L = max(len(s) for s in seqs)
    L = -(-L // multiple_of) * multiple_of
    if length is not None:
        if max(len(s) for s in seqs) > length:
            raise LladaError(
                f"an SFT record has {max(len(s) for s in seqs)} tokens, more than data.pad_to_length={length}: "
                "raise it or rebuild the records with llada-sft-data --max-length"
            )
        L = length
    ids = np.full((len(seqs), L), eos_id, dtype=np.int64)  # (B, L)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return {
        "input_ids": torch.from_numpy(ids),
        "prompt_len": torch.tensor(prompt_lens, dtype=torch.long),
    }


class SFTRecords:
    """Records folder of ``llada-sft-data``; ``__call__`` fetches and collates a batch."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        eos_id: int,
        multiple_of: int,
        length: int | None,
    ) -> None:
        self.folder, self.m = folder, manifest
        self.eos_id, self.multiple_of, self.length = eos_id, multiple_of, length
        self.num_records = int(manifest["num_records"])
        self._maps: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def _open(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            self._maps = {
                k: np.memmap(self.folder / f["file"], dtype=f["dtype"], mode="r").view(np.ndarray)
                for k, f in self.m["files"].items()
            }
        return self._maps

    def __call__(self, src: np.ndarray, items: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches for ``items`` (g, B): g dicts, each padded to its own longest record."""
        m = self._open()
        off, plen, toks = m["offsets"], m["prompt_len"], m["tokens"]
        for row in items.tolist():
            seqs = [toks[off[i] : off[i + 1]] for i in row]
            yield collate_sft(
                seqs, [int(plen[i]) for i in row], self.eos_id, self.multiple_of, self.length
            )


def check_record_files(mpath: Path, m: dict[str, Any], verify_checksums: bool, what: str) -> None:
    """Every file a records manifest lists exists with its size (and sha256 when asked)."""
    for f in m["files"].values():
        check_file(
            mpath.parent / f["file"],
            int(f["num_items"]),
            np.dtype(f["dtype"]),
            f.get("sha256") if verify_checksums else None,
            what,
        )


def load_sft_manifest(path: str | Path, verify_checksums: bool = False) -> dict[str, Any]:
    """The records manifest after checking its files (existence, sizes, optional sha256)."""
    mpath = manifest_path(path)
    m = read_json(mpath)
    if m.get("format") != "llada-sft-records":
        raise LladaError(
            f"{mpath} is not an SFT records manifest: build records with llada-sft-data"
        )
    check_record_files(mpath, m, verify_checksums, "SFT records file")
    if m["files"]["offsets"]["num_items"] != m["num_records"] + 1:
        raise LladaError(f"{mpath}: offsets do not match num_records; rebuild the records")
    return m


def _records_manifest(
    path: str, cfg: SFTDataConfig, vocab_size: int | None, verify_checksums: bool
) -> dict[str, Any]:
    """A records folder's checked manifest: files, tokenizer, vocabulary."""
    m = load_sft_manifest(path, verify_checksums)
    check_tokenizer(m, cfg.tokenizer, f"in SFT records {path}")
    if vocab_size is not None:
        check_vocab(int(m["vocab_size"]), vocab_size, f"in SFT records {path}")
    return m


def check_sft_data(cfg: SFTDataConfig, vocab_size: int, max_length: int) -> None:
    """The reader's manifest checks (no checksums), plus no record longer than ``max_length``
    (the model's ``max_sequence_length``): run before any process group."""
    for path in (cfg.path, cfg.val_path):
        if path:
            m = _records_manifest(path, cfg, vocab_size, verify_checksums=False)
            check_record_lengths(m, path, max_length)


def check_record_lengths(m: dict[str, Any], path: str, limit: int) -> None:
    """Raise naming the first record of ``path`` (manifest ``m``) longer than ``limit``: the
    manifest's ``max_record_length`` says whether to look."""
    if int(m.get("max_record_length", limit + 1)) <= limit:
        return
    f = m["files"]["offsets"]
    offsets = np.memmap(manifest_path(path).parent / f["file"], dtype=f["dtype"], mode="r")
    lengths = np.diff(offsets.astype(np.int64))  # (num_records,)
    over = np.flatnonzero(lengths > limit)
    if len(over):
        i = int(over[0])
        raise LladaError(
            f"SFT record {i} of {path} has {int(lengths[i])} tokens, more than the model's "
            f"max_sequence_length={limit} ({len(over)} such records): rebuild the records with "
            f"llada-sft-data --max-length {limit}"
        )


def _record_source(records: SFTRecords, first: int, where: str) -> ValidationSource:
    """Records ``first ..`` of ``records`` as validation items (tokens, prompt length)."""

    def read(idx: np.ndarray) -> list[ValItem]:
        m = records._open()
        off, plen, toks = m["offsets"], m["prompt_len"], m["tokens"]
        rows = (first + idx).tolist()
        return [(toks[off[i] : off[i + 1]].astype(np.int64), int(plen[i])) for i in rows]

    return ValidationSource(records.num_records - first, read, where)



def check_records_eos(manifest: dict[str, Any], eos_token_id: int, what: str) -> None:
    """Records padded with one EOS id cannot train a model whose EOS is another."""
    if manifest.get("eos_id") is not None and int(manifest["eos_id"]) != eos_token_id:
        raise LladaError(
            f"EOS mismatch in {what}: records use EOS id {manifest['eos_id']}, the model "
            f"{eos_token_id}: set model.eos_token_id to the tokenizer's EOS or rebuild the records"
        )


def records_reader(
    source: Any,
    size: int,
    kind: str,
    manifest: dict[str, Any],
    cfg: SFTDataConfig,
    micro_batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
) -> StreamReader:
    """This rank's endless batches of the first ``size`` items of one record source (SFT
    records or preference pairs); its identity ties a resumed run to the same records."""
    return StreamReader(
        source,
        sizes=[size],
        weights=[1.0],
        batch=micro_batch_size,
        seed=seed,
        rank=rank,
        world=world_size,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor,
        identity={"kind": kind, "records_sha256": manifest["files"]["tokens"].get("sha256")},
    )

def build_sft_reader(
    cfg: SFTDataConfig,
    micro_batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    eos_token_id: int,
    vocab_size: int | None = None,
) -> tuple[StreamReader, ReaderInfo]:
    """Reader whose ``next()`` gives ``{"input_ids": (B, L), "prompt_len": (B,)}`` forever, and
    its info (``num_records``, ``vocab_size``, the manifest). ``reader.epoch`` counts passes.
    ``vocab_size`` (the model's): records made with a larger vocabulary are refused."""
    m = _records_manifest(cfg.path, cfg, vocab_size, cfg.verify_checksums)
    check_records_eos(m, eos_token_id, f"SFT records {cfg.path}")
    records = SFTRecords(
        manifest_path(cfg.path).parent,
        m,
        eos_token_id,
        max(1, cfg.pad_to_multiple_of),
        cfg.pad_to_length,
    )
    held = 0 if cfg.val_path else carve_count(records.num_records, cfg.val_fraction, cfg.path)
    if cfg.val_path:
        vm = _records_manifest(cfg.val_path, cfg, vocab_size, cfg.verify_checksums)
        val_records = SFTRecords(manifest_path(cfg.val_path).parent, vm, eos_token_id, 1, None)
        validation = _record_source(val_records, 0, cfg.val_path)
    else:
        first = records.num_records - held
        validation = _record_source(records, first, cfg.path) if held else None
    # the held-out last records lie past the size the reader walks: training never sees them
    reader = records_reader(
        records, records.num_records - held, "sft", m, cfg, micro_batch_size, seed, rank, world_size
    )
    info = ReaderInfo(
        vocab_size=int(m["vocab_size"]),
        num_records=records.num_records - held,
        manifests=[m],
        validation=validation,
    )
    return reader, info
