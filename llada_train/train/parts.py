"""What the trainer is handed: typed seams between the entry point and the loop.

The loop knows nothing of masks or chat templates: it drives any ``Objective`` over any
``Reader``. The entry point builds the parts; the loop owns what it does with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from llada_train.data.stream import Reader
from llada_train.diffusion.forward import NoiseKey
from llada_train.model.config import ModelConfig
from llada_train.train.distributed import DistInfo
from llada_train.train.preemption import PreemptionFlag
from llada_train.train.validation import Validator


class ObjectiveOutput(Protocol):
    """What an objective returns: the scalar to backpropagate and the tokens it saw."""

    @property
    def loss(self) -> torch.Tensor: ...

    @property
    def num_tokens(self) -> int: ...


class Objective(Protocol):
    """``objective(model, batch, noise)``: pretraining and SFT differ only here.

    ``noise`` is the step's ``NoiseKey`` when the batch holds ``sample_index``, else a
    ``torch.Generator`` stream.
    """

    def __call__(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator | NoiseKey,
    ) -> ObjectiveOutput: ...


@dataclass
class TrainerParts:
    """The built things the loop drives."""

    model: torch.nn.Module  # not yet wrapped by DeepSpeed (the trainer makes the engine)
    model_cfg: ModelConfig  # for the export's config.json and the FLOPs count
    objective: Objective
    reader: Reader  # this rank's batches
    dist: DistInfo
    # installed by the entry point before start-up; None: a fresh flag with no handlers
    preemption: PreemptionFlag | None = None
    validator: Validator | None = None  # held-out ELBO every ``trainer.eval_every`` steps


@dataclass
class RunContext:
    """Where this run lives and what it records beside its weights."""

    run_dir: Path
    seed: int
    tokenizer: str | None = None  # copied into the export
    config_dict: dict[str, Any] | None = None  # the resolved root config, for wandb
