"""Small random models saved in the released layout, for end-to-end runs in tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from llada_train.model import LLaDAModel, save_pretrained
from llada_train.model.checkpoint import named_weights
from llada_train.model.config import ModelConfig
from tests.conftest import REPO


def save_tiny_model(out: Path, seed: int = 0, **changes: Any) -> Path:
    """``conf/model/tiny.yaml`` with ``changes`` (e.g. ``n_layers=2``), random weights of
    ``seed``, saved as a model folder at ``out``."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/tiny.yaml")
    )
    cfg = dataclasses.replace(OmegaConf.to_object(cfg), **changes)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return save_pretrained(dict(named_weights(model)), cfg, out)
