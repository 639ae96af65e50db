"""Typed, strict root configs for the Hydra entry points: they only compose.

Each group in ``conf/`` merges into a dataclass that lives beside the code it configures
(``TrainerConfig`` beside the loop, ``OptimConfig`` beside the optimizer, ...), so an
unknown key or a wrong type fails with Hydra's message. Code below an entry point receives
its own sub-config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from llada_train.data.config import PretrainDataConfig, SFTDataConfig
from llada_train.data.prompts import PromptDataConfig
from llada_train.diffusion.losses import ObjectiveConfig
from llada_train.eval.decode import DecodeConfig, register_decode_schemas
from llada_train.model.config import ModelConfig
from llada_train.model.lora import PeftConfig
from llada_train.train.distributed import DeepSpeedConfig
from llada_train.train.loop import TrainerConfig
from llada_train.train.metrics import LoggingConfig
from llada_train.train.optim import OptimConfig
from llada_train.train.schedule import ScheduleConfig

__all__ = [
    "CONF_DIR",
    "LoggingConfig",
    "OptimConfig",
    "PretrainConfig",
    "RLConfig",
    "RunConfig",
    "SFTConfig",
    "TrainerConfig",
    "register_configs",
    "to_container",
]

# The Hydra config tree. An absolute path: Hydra would otherwise look for a Python module
# named ``conf`` when the entry point is imported from an installed package.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@dataclass
class RunConfig:
    """Fields shared by the pretraining and SFT entry points."""

    run_dir: str = "runs/default"
    seed: int = 0
    # released-layout folder (our export or GSAI-ML/LLaDA-8B-Base) to start from
    init_from: str | None = None
    model: ModelConfig = MISSING
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)  # none (full) | lora


@dataclass
class PretrainConfig(RunConfig):
    """Root of ``conf/pretrain.yaml``."""

    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)


@dataclass
class SFTConfig(RunConfig):
    """Root of ``conf/sft.yaml``."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)


@dataclass
class RLConfig(RunConfig):
    """Root of ``conf/rl.yaml``: prompts with rewards, and the rollouts' sampler."""

    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    decode: DecodeConfig = MISSING  # a conf/decode option: decode=<method>


def register_configs() -> None:
    """Register the schemas that ``conf/*.yaml`` name in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="sft_schema", node=SFTConfig)
    cs.store(name="rl_schema", node=RLConfig)
    register_decode_schemas()  # rl.yaml's decode group


def to_container(cfg: Any) -> dict:
    """A resolved plain-dict copy of an OmegaConf config (for saving and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
