"""Data sub-configs (Hydra group ``data/``): structured-config schemas, every field defaulted."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One shard set of a pre-training mixture."""

    path: str = ""  # folder holding manifest.json + shard files
    weight: float = 1.0  # relative share of samples (normalised over sources)


@dataclass
class PretrainDataConfig:
    """Token shards for pre-training: one folder (``path``) or a weighted mixture (``sources``)."""

    path: str = "runs/demo/data/shards"  # folder holding manifest.json + shard files
    tokenizer: str | None = (
        "runs/demo/data/tokenizer.json"  # tokenizer.json or HF folder; checked against the manifest; null skips
    )
    sources: list[SourceConfig] = field(
        default_factory=list
    )  # non-empty: a mixture, and `path` is ignored
    verify_checksums: bool = False  # sha256 every shard at start (slow on TBs)
    num_workers: int = 0  # dataloader worker processes (0: read in the training process)
    prefetch_factor: int = 4  # batches each worker reads ahead
    # validation windows: held-out shards (a folder like ``path``), or a fraction of each
    # source's windows kept out of training (its last windows); val_path wins when both are set
    val_path: str | None = None
    val_fraction: float = 0.0
    # windows keep document boundaries: batches carry ``document_ids`` (a new id after each
    # EOS) and attention stays inside each document
    document_mask: bool = False


@dataclass
class SFTDataConfig:
    """SFT records made by ``llada-sft-data``."""

    path: str = "runs/demo/data/sft"  # folder holding records manifest.json + arrays
    tokenizer: str | None = (
        "runs/demo/data/tokenizer.json"  # checked against the records manifest; null skips
    )
    verify_checksums: bool = False
    num_workers: int = 0
    prefetch_factor: int = 4
    pad_to_multiple_of: int = 1  # round the padded batch length up (e.g. 8 for tensor cores)
    pad_to_length: int | None = (
        None  # pad every batch to exactly this length (fixed shapes); longer records are an error
    )
    # validation records: a held-out records folder, or the last fraction of these records
    val_path: str | None = None
    val_fraction: float = 0.0
