"""What the training entry points share: run-dir bookkeeping and the build-then-fit sequence."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from llada_train.atomic import write_text_atomic
from llada_train.config import to_container
from llada_train.diffusion import build_objective
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig
from llada_train.tokenizer import check_tokenizer_fits, load_tokenizer
from llada_train.train.build import build_model, resolve_model_config
from llada_train.train.distributed import init_distributed, render_deepspeed_config
from llada_train.train.loop import Trainer, TrainResult, install_preemption_handlers, use_bf16


def code_version() -> dict[str, Any]:
    """Git commit and dirty flag of the code that runs (None outside a checkout)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def write_run_info(run_dir: Path, cfg: DictConfig, world_size: int) -> None:
    """Resolved config and code version, so a run can be read without wandb."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    info = {**code_version(), "world_size": world_size, "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with (run_dir / "run_info.jsonl").open("a") as f:  # one line per (re)start of the job
        f.write(json.dumps(info) + "\n")


# (data_cfg, model_cfg, seq_len, micro_batch_size, seed, rank, world_size) -> reader
def steps_for_epochs(epochs: float, reader: Any, global_batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over a record dataset."""
    if not hasattr(reader, "num_records"):
        raise LladaError("trainer.epochs needs a record dataset (SFT data); set trainer.max_steps instead")
    return max(1, math.ceil(epochs * reader.num_records / global_batch))


ReaderBuilder = Callable[[Any, ModelConfig, int, int, int, int, int], Any]


def run_training(cfg: DictConfig, build_reader: ReaderBuilder) -> TrainResult:
    """Build model, data, objective and trainer from the root config, then train."""
    install_preemption_handlers()
    info = init_distributed()
    try:
        run_dir = Path(cfg.run_dir)
        if info.rank == 0:
            write_run_info(run_dir, cfg, info.world_size)
        model_cfg = resolve_model_config(OmegaConf.to_object(cfg.model), cfg.init_from)
        tokenizer_path = cfg.data.tokenizer
        if tokenizer_path:
            check_tokenizer_fits(load_tokenizer(tokenizer_path), model_cfg, tokenizer_path)
        if cfg.trainer.seq_len > model_cfg.max_sequence_length:
            raise LladaError(
                f"trainer.seq_len={cfg.trainer.seq_len} exceeds model.max_sequence_length="
                f"{model_cfg.max_sequence_length}: shorten trainer.seq_len"
            )
        reader = build_reader(
            cfg.data,
            model_cfg,
            cfg.trainer.seq_len,
            cfg.trainer.micro_batch_size,
            cfg.seed,
            info.rank,
            info.world_size,
        )
        trainer_cfg = OmegaConf.to_object(cfg.trainer)
        if trainer_cfg.epochs > 0:
            trainer_cfg.max_steps = steps_for_epochs(trainer_cfg.epochs, reader, trainer_cfg.global_batch_size)
        ds = OmegaConf.to_object(cfg.deepspeed)
        ds_json = render_deepspeed_config(
            ds,
            cfg.trainer.global_batch_size,
            cfg.trainer.micro_batch_size,
            info.world_size,
            cfg.optim.grad_clip,
            use_bf16(cfg.trainer.precision, info.device),
        )
        model = build_model(model_cfg, ds.zero_stage, ds_json, cfg.seed, cfg.init_from)
        trainer = Trainer(
            model=model,
            model_cfg=model_cfg,
            objective=build_objective(OmegaConf.to_object(cfg.objective), model_cfg.mask_token_id),
            reader=reader,
            dist_info=info,
            run_dir=run_dir,
            seed=cfg.seed,
            trainer=trainer_cfg,
            optim=OmegaConf.to_object(cfg.optim),
            schedule=OmegaConf.to_object(cfg.schedule),
            deepspeed_cfg=ds,
            logging=OmegaConf.to_object(cfg.logging),
            tokenizer=tokenizer_path,
            config_dict=to_container(cfg),
        )
        return trainer.fit()
    except LladaError as exc:
        prefix = f"[rank {info.rank}] " if info.world_size > 1 else ""
        print(f"error: {prefix}{exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
