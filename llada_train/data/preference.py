"""Preference reader for VRPO: pairs of ``llada-preference-data``, shuffled by seed and epoch.

A micro-batch of B pairs is ``input_ids`` (2B, L): rows [0, B) prompt + chosen, rows [B, 2B)
prompt + rejected, all EOS-padded to the longest record (the padding is response, as in SFT),
``prompt_len`` (2B,), and the stream's ``sample_index`` (B,) that keys the pair's masks.
The data config is the SFT one (``SFTDataConfig``); validation sets are not read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llada_train.data.config import SFTDataConfig
from llada_train.data.manifest import (
    check_tokenizer,
    check_vocab,
    manifest_path,
    read_json,
)
from llada_train.data.sft import (
    SFTRecords,
    check_record_files,
    check_records_eos,
    collate_sft,
    records_reader,
)
from llada_train.data.stream import ReaderInfo, StreamReader
from llada_train.errors import LladaError

FORMAT = "llada-preference-records"


def load_preference_manifest(
    path: str | Path, cfg: SFTDataConfig, vocab_size: int | None, verify_checksums: bool = False
) -> dict[str, Any]:
    """A preference folder's checked manifest: format, files, tokenizer, vocabulary."""
    mpath = manifest_path(path)
    m = read_json(mpath)
    if m.get("format") != FORMAT:
        raise LladaError(
            f"{mpath} is not a preference records manifest (format "
            f"{m.get('format')!r}): build the records with llada-preference-data"
        )
    check_record_files(mpath, m, verify_checksums, "preference records file")
    if m["files"]["offsets"]["num_items"] != 2 * m["num_pairs"] + 1:
        raise LladaError(f"{mpath}: offsets do not match num_pairs; rebuild the records")
    check_tokenizer(m, cfg.tokenizer, f"in preference records {path}")
    if vocab_size is not None:
        check_vocab(int(m["vocab_size"]), vocab_size, f"in preference records {path}")
    return m


def check_preference_data(cfg: SFTDataConfig, vocab_size: int, max_length: int) -> None:
    """Manifest checks plus no record longer than ``max_length`` (before any process group)."""
    if cfg.val_path or cfg.val_fraction:
        raise LladaError(
            "llada-dpo reads no validation data: set data.val_path=null and data.val_fraction=0"
        )
    m = load_preference_manifest(cfg.path, cfg, vocab_size)
    if int(m["max_record_length"]) > max_length:
        raise LladaError(
            f"preference records {cfg.path} hold a record of {m['max_record_length']} tokens, "
            f"more than the model's max_sequence_length={max_length}: rebuild them with "
            f"llada-preference-data --max-length {max_length}"
        )


class PreferencePairs(SFTRecords):
    """Records folder of ``llada-preference-data`` (the SFT layout, two records a pair);
    ``__call__`` fetches and collates pairs."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        eos_id: int,
        multiple_of: int,
        length: int | None,
    ) -> None:
        super().__init__(folder, {**manifest, "num_records": 2 * int(manifest["num_pairs"])},
                         eos_id, multiple_of, length)  # fmt: skip
        self.num_pairs = int(manifest["num_pairs"])

    def __call__(self, src: np.ndarray, items: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches for the pair indices ``items`` (g, B): chosen rows, then rejected."""
        m = self._open()
        off, plen, toks = m["offsets"], m["prompt_len"], m["tokens"]
        for row in items.tolist():
            seqs = [toks[off[2 * i + r] : off[2 * i + r + 1]] for r in (0, 1) for i in row]
            prompts = [int(plen[i]) for i in row] * 2
            yield collate_sft(seqs, prompts, self.eos_id, self.multiple_of, self.length)


def build_preference_reader(
    cfg: SFTDataConfig,
    micro_batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    eos_token_id: int,
    vocab_size: int | None = None,
) -> tuple[StreamReader, ReaderInfo]:
    """This rank's endless pair batches (micro-batch = pairs) and the data's info."""
    m = load_preference_manifest(cfg.path, cfg, vocab_size, cfg.verify_checksums)
    check_records_eos(m, eos_token_id, f"preference records {cfg.path}")
    pairs = PreferencePairs(
        manifest_path(cfg.path).parent,
        m,
        eos_token_id,
        max(1, cfg.pad_to_multiple_of),
        cfg.pad_to_length,
    )
    reader = records_reader(
        pairs, pairs.num_pairs, "preference", m, cfg, micro_batch_size, seed, rank, world_size
    )
    info = ReaderInfo(
        vocab_size=int(m["vocab_size"]), num_records=pairs.num_pairs, manifests=[m], validation=None
    )
    return reader, info
