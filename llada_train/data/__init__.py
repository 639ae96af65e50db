"""Data readers: token-shard windows for pre-training, padded SFT records; exact-resume state.

The reader builders import torch, so they load on first use: the offline pipelines
(``data_pipelines``) import this package's light modules without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llada_train.data.config import PretrainDataConfig, SFTDataConfig, SourceConfig
from llada_train.data.manifest import check_vocab

if TYPE_CHECKING:
    from llada_train.data.pretrain import build_pretrain_reader
    from llada_train.data.sft import build_sft_reader, collate_sft

__all__ = [
    "PretrainDataConfig",
    "SFTDataConfig",
    "SourceConfig",
    "build_pretrain_reader",
    "build_sft_reader",
    "check_vocab",
    "collate_sft",
]

_LAZY = {
    "build_pretrain_reader": "llada_train.data.pretrain",
    "build_sft_reader": "llada_train.data.sft",
    "collate_sft": "llada_train.data.sft",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
