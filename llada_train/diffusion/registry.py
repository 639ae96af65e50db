"""The one table of objectives: ``objective.name`` -> the class that computes it.

Entries are ``"module:Class"`` strings imported on first use, so this module imports no
objective and no objective imports it: adding an objective is a new module, a line here and
a ``conf/objective/<name>.yaml`` (plus, for new options, their fields on ``ObjectiveConfig``,
the group's Hydra schema).

An objective class is built as ``cls(cfg, mask_token_id, eos_token_id)`` and called as
``objective(model, batch, noise) -> LossOutput``. It may define a classmethod
``prepare(cfg, model_cfg, seq_len, curriculum)`` that checks the run at start-up and returns
the model config to train and export (see ``prepare_run``).
"""

from __future__ import annotations

import importlib
from typing import Any

from llada_train.diffusion.objective_base import ObjectiveConfig, full_sequence_run
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

OBJECTIVES: dict[str, str] = {
    "pretrain": "llada_train.diffusion.losses:PretrainObjective",  # SPEC §2
    "sft": "llada_train.diffusion.losses:SFTObjective",  # SPEC §3
    "ar": "llada_train.diffusion.ar:ARObjective",  # the causal twin's next-token CE
    "block": "llada_train.diffusion.block:BlockObjective",  # SPEC §8, BD3-LM / LLaDA 2.0
    "vrpo": "llada_train.diffusion.vrpo:VRPOObjective",  # LLaDA 1.5 preference optimisation
    "espo": "llada_train.rl.objective:ESPOObjective",  # sequence-level RL (llada-rl)
}


def objective_class(name: str) -> type:
    """The class registered as ``name`` (one line naming the choices when unknown)."""
    if name not in OBJECTIVES:
        raise LladaError(f"objective.name={name!r} is unknown; use one of {sorted(OBJECTIVES)}")
    module, _, attr = OBJECTIVES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_objective(cfg: ObjectiveConfig, mask_token_id: int, eos_token_id: int | None = None) -> Any:
    """The objective named by ``cfg.name``; ``eos_token_id`` pads block-diffusion SFT rows."""
    return objective_class(cfg.name)(cfg, mask_token_id, eos_token_id)


def prepare_run(
    cfg: ObjectiveConfig,
    model_cfg: ModelConfig,
    seq_len: int,
    curriculum: list[int],  # block sizes of schedule.block_phases (0 = the whole sequence)
) -> ModelConfig:
    """Start-up checks of the objective against the run; returns the model config to train.

    Without a ``prepare`` hook the objective trains full-sequence passes
    (``objective_base.full_sequence_run``).
    """
    hook = getattr(objective_class(cfg.name), "prepare", None)
    if hook is not None:
        return hook(cfg, model_cfg, seq_len, curriculum)
    return full_sequence_run(cfg, model_cfg, curriculum)
