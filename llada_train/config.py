"""Typed, strict root configs for the Hydra entry points.

Each group in ``conf/`` merges into one of these dataclasses, so an unknown key or a wrong
type fails with Hydra's message. Code below an entry point receives its own sub-config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from llada_train.data.config import PretrainDataConfig, SFTDataConfig
from llada_train.diffusion.losses import ObjectiveConfig
from llada_train.model.config import ModelConfig
from llada_train.train.distributed import DeepSpeedConfig
from llada_train.train.schedule import ScheduleConfig

# The Hydra config tree. An absolute path: Hydra would otherwise look for a Python module
# named ``conf`` when the entry point is imported from an installed package.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@dataclass
class OptimConfig:
    """AdamW; weight decay applies to matrices only (not norm weights)."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class LoggingConfig:
    """Where metrics go: stdout and ``metrics.jsonl`` always, wandb per ``wandb_mode``."""

    log_every: int = 10
    wandb_mode: str = "disabled"  # "disabled", "offline" or "online"
    wandb_project: str = "llada-train"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    progress_bar: bool = True


@dataclass
class TrainerConfig:
    """Loop settings: batch arithmetic, length, checkpoints, guards."""

    max_steps: int = 100
    epochs: float = 0.0  # > 0: max_steps = ceil(epochs x records / global batch) (SFT data)
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 16  # sequences per rank per forward
    seq_len: int = 128
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    export_at_end: bool = True  # consolidated safetensors export in run_dir/export
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    peak_flops_per_device: float = 989e12  # H100 dense bf16; MFU's denominator
    inject_nan_at_batches: list[int] = field(default_factory=list)  # test hook: NaN loss on these micro-batches


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


@dataclass
class PretrainConfig(RunConfig):
    """Root of ``conf/pretrain.yaml``."""

    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)


@dataclass
class SFTConfig(RunConfig):
    """Root of ``conf/sft.yaml``."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)


def register_configs() -> None:
    """Register the schemas that ``conf/*.yaml`` name in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="sft_schema", node=SFTConfig)


def to_container(cfg: Any) -> dict:
    """A resolved plain-dict copy of an OmegaConf config (for saving and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
