"""What the training entry points share: run-dir bookkeeping and the build-then-fit sequence."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from llada_train.atomic import write_text_atomic
from llada_train.config import to_container
from llada_train.data.stream import Reader, ReaderInfo
from llada_train.diffusion import ObjectiveConfig, build_objective
from llada_train.diffusion.registry import prepare_run
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig
from llada_train.tokenizer import check_tokenizer_fits, load_tokenizer
from llada_train.train.build import build_model, check_init_from, resolve_model_config
from llada_train.train.checkpointing import check_resume_world_size, latest_tag
from llada_train.train.distributed import (
    DeepSpeedConfig,
    DistInfo,
    init_distributed,
    render_deepspeed_config,
)
from llada_train.train.loop import LoopConfigs, Trainer, TrainerConfig, TrainResult, use_bf16
from llada_train.train.optim import OptimConfig
from llada_train.train.parts import Objective, RunContext, TrainerParts
from llada_train.train.preemption import PreemptionFlag
from llada_train.train.run_lock import hold_run_dir
from llada_train.train.schedule import ScheduleConfig, curriculum_sizes
from llada_train.train.validation import ValidationConfig, Validator


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
    if job := os.environ.get("SLURM_JOB_ID"):  # a requeued job starts again under its own id
        info.update(slurm_job_id=job, slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    with (run_dir / "run_info.jsonl").open("a") as f:  # one line per (re)start of the job
        f.write(json.dumps(info) + "\n")


def steps_for_epochs(epochs: float, info: ReaderInfo, global_batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over a record dataset."""
    if info.num_records is None:
        raise LladaError(
            "trainer.epochs needs a record dataset (SFT data); set trainer.max_steps instead"
        )
    return max(1, math.ceil(epochs * info.num_records / global_batch))


@dataclass
class ReaderRequest:
    """What the loop needs of this rank's reader, beside the data config."""

    seq_len: int
    micro_batch_size: int
    seed: int
    rank: int
    world_size: int


def build_validator(
    trainer_cfg: TrainerConfig,
    obj_cfg: ObjectiveConfig,
    data_info: ReaderInfo,
    model_cfg: ModelConfig,
    seed: int,
    document_mask: bool,
    info: DistInfo,
) -> Validator | None:
    """The held-out ELBO of ``trainer.eval_every`` (None when off)."""
    if trainer_cfg.eval_every == 0:
        return None
    if data_info.validation is None:
        raise LladaError(
            f"trainer.eval_every={trainer_cfg.eval_every} but there is no validation data: "
            "set data.val_path (held-out data) or data.val_fraction (e.g. 0.01)"
        )
    if obj_cfg.name not in ("pretrain", "sft"):
        raise LladaError(
            f"trainer.eval_every scores the masked-diffusion ELBO; objective.name={obj_cfg.name!r} "
            "has none: set trainer.eval_every=0"
        )
    vcfg = ValidationConfig(
        every=trainer_cfg.eval_every,
        windows=trainer_cfg.eval_windows,
        samples_per_window=trainer_cfg.eval_samples_per_window,
        rows_per_forward=trainer_cfg.micro_batch_size,
        eps=obj_cfg.eps,
        seed=seed,
        loss_chunk_rows=obj_cfg.loss_chunk_rows,
    )
    items = data_info.validation.take(vcfg.windows)
    eos = model_cfg.eos_token_id if document_mask else None
    return Validator(items, vcfg, model_cfg.mask_token_id, info.rank, info.world_size,
                     info.device, eos)


# (data_cfg, model_cfg, request) -> (reader, info)
ReaderBuilder = Callable[[Any, ModelConfig, ReaderRequest], tuple[Reader, ReaderInfo]]
# (objective config, model config) -> the objective the loop calls
ObjectiveBuilder = Callable[[ObjectiveConfig, ModelConfig], Objective]


def default_objective(cfg: ObjectiveConfig, model_cfg: ModelConfig) -> Objective:
    """The objective named by ``objective.name`` (diffusion/registry.py's table)."""
    return build_objective(cfg, model_cfg.mask_token_id, model_cfg.eos_token_id)


@dataclass
class Preflight:
    """What the entry point settles before any process group or engine exists."""

    model_cfg: ModelConfig
    trainer_cfg: TrainerConfig
    optim_cfg: OptimConfig
    ds_cfg: DeepSpeedConfig
    ds_json: dict[str, Any]  # rendered once: the model (ZeRO-3 builds partitioned) and the engine


# (root config, resolved model config) -> None, raising LladaError: an entry point's own checks
StartCheck = Callable[[DictConfig, ModelConfig], None]


def preflight(cfg: DictConfig, world_size: int, check: StartCheck | None = None) -> Preflight:
    """Checks that need no process group: the architecture (``init_from``'s config.json and
    its safetensors headers), the tokenizer against it, lengths, the objective against the
    model, batch arithmetic, the entry point's ``check`` (the data's manifests against the
    model; SFT also: ``init_from`` given, records that fit it), and the world size of a resume.

    Run before ``init_distributed`` so a mistake costs seconds, not a DeepSpeed start-up.
    """
    model_cfg = resolve_model_config(OmegaConf.to_object(cfg.model), cfg.init_from)
    if check is not None:
        check(cfg, model_cfg)
    if cfg.init_from:
        check_init_from(model_cfg, cfg.init_from)
    if cfg.data.tokenizer:
        check_tokenizer_fits(load_tokenizer(cfg.data.tokenizer), model_cfg, cfg.data.tokenizer)
    trainer_cfg: TrainerConfig = OmegaConf.to_object(cfg.trainer)
    if trainer_cfg.seq_len > model_cfg.max_sequence_length:
        raise LladaError(
            f"trainer.seq_len={trainer_cfg.seq_len} exceeds model.max_sequence_length="
            f"{model_cfg.max_sequence_length}: shorten trainer.seq_len"
        )
    # the objective against the model, the length and the schedule's block curriculum; it
    # returns the model config to train and export (e.g. objective=block records its blocks)
    obj_cfg: ObjectiveConfig = OmegaConf.to_object(cfg.objective)
    schedule_cfg: ScheduleConfig = OmegaConf.to_object(cfg.schedule)
    model_cfg = prepare_run(obj_cfg, model_cfg, trainer_cfg.seq_len, curriculum_sizes(schedule_cfg))
    optim_cfg: OptimConfig = OmegaConf.to_object(cfg.optim)
    ds_cfg: DeepSpeedConfig = OmegaConf.to_object(cfg.deepspeed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as init_distributed
    ds_json = render_deepspeed_config(
        ds_cfg,
        trainer_cfg.global_batch_size,
        trainer_cfg.micro_batch_size,
        world_size,
        optim_cfg.grad_clip,
        use_bf16(trainer_cfg.precision, device),
    )
    tag = latest_tag(cfg.run_dir)  # a resume: can this world size continue it?
    if tag is not None:
        check_resume_world_size(cfg.run_dir, tag, world_size)
    return Preflight(model_cfg, trainer_cfg, optim_cfg, ds_cfg, ds_json)


def check_post_training(cfg: DictConfig, entry: str, objective: str, purpose: str) -> None:
    """What llada-dpo and llada-rl both need: a starting model, their own objective, and
    LoRA when the reference is the LoRA base."""
    if not cfg.init_from:
        raise LladaError(f"{entry} needs init_from=<model folder> (the SFT model to {purpose})")
    if cfg.objective.name != objective:
        raise LladaError(
            f"{entry} trains objective={objective}, not {cfg.objective.name}: "
            "drop the objective override"
        )
    if cfg.objective.reference == "lora_base" and cfg.peft.method != "lora":
        raise LladaError(
            "objective.reference=lora_base is the LoRA base with the adapters off: "
            "set peft=lora, or use objective.reference=frozen_copy"
        )


def _one_line(exc: LladaError) -> str:
    """The error's own line; a dataloader worker's error arrives wrapped in its traceback."""
    text = str(exc)
    if text.startswith("Caught LladaError"):  # torch re-raises it as "Caught ...\n<traceback>"
        text = text.rstrip().splitlines()[-1].split("LladaError: ", 1)[-1]
    return text


def _job_store() -> Any | None:
    """A store every rank of the job reaches: the process group's, or before it exists
    torchrun's agent store (the one ``init_process_group`` itself joins); else None."""
    if dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=10))
    return None


def _first_to_report(text: str, rank: int) -> bool:
    """Whether this rank prints ``text``: the first rank to report it, counted in the job's
    store (no collective: other ranks may be healthy). Without a store only rank 0 prints;
    when the store does not answer, every rank does."""
    try:
        store = _job_store()
        if store is None:
            return rank == 0
        store.set_timeout(timedelta(seconds=10))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        key = f"llada_error/{restart}/{hashlib.sha256(text.encode()).hexdigest()}"
        return store.add(key, 1) == 1
    except Exception:  # a lost store must not keep a rank from saying why it stops
        return True


def _fail(exc: LladaError, rank: int, world_size: int, after_setup: bool) -> NoReturn:
    """One ``error:`` line on stderr, exit code 2. A line several ranks hit prints once (from
    whichever comes first); after the process group exists it names that rank."""
    text = _one_line(exc)
    if world_size == 1 or _first_to_report(text, rank):
        named = world_size > 1 and after_setup
        print(f"error: {f'[rank {rank}] ' if named else ''}{text}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_training(
    cfg: DictConfig,
    build_reader: ReaderBuilder,
    make_objective: ObjectiveBuilder = default_objective,
    check: StartCheck | None = None,
) -> TrainResult:
    """Build model, data, objective and trainer from the root config, then train.

    ``make_objective`` is a seam for tests (e.g. one that injects non-finite losses);
    ``check`` runs in ``preflight``, before any process group.
    """
    # first, so a pre-emption signal during start-up is remembered rather than fatal
    preemption = PreemptionFlag.install()
    # torchrun / the deepspeed launcher / srun set these before the process group exists
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        pre = preflight(cfg, world, check)
        if rank == 0:  # before any process group: a second job stops in seconds
            hold_run_dir(cfg.run_dir)
    except LladaError as exc:
        _fail(exc, rank, world, after_setup=False)
    model_cfg, trainer_cfg, optim_cfg, ds_cfg, ds_json = (
        pre.model_cfg, pre.trainer_cfg, pre.optim_cfg, pre.ds_cfg, pre.ds_json
    )
    tokenizer_path = cfg.data.tokenizer
    info = init_distributed()
    try:
        run_dir = Path(cfg.run_dir)
        if info.rank == 0:
            write_run_info(run_dir, cfg, info.world_size)
        request = ReaderRequest(
            trainer_cfg.seq_len, trainer_cfg.micro_batch_size, cfg.seed, info.rank, info.world_size
        )
        reader, data_info = build_reader(cfg.data, model_cfg, request)
        if trainer_cfg.epochs > 0:
            trainer_cfg.max_steps = steps_for_epochs(
                trainer_cfg.epochs, data_info, trainer_cfg.global_batch_size
            )
        obj_cfg: ObjectiveConfig = OmegaConf.to_object(cfg.objective)
        validator = build_validator(
            trainer_cfg, obj_cfg, data_info, model_cfg, cfg.seed,
            bool(cfg.data.get("document_mask", False)), info,
        )
        peft_cfg = OmegaConf.to_object(cfg.peft)  # none, or LoRA adapters on the loaded base
        model = build_model(model_cfg, ds_cfg.zero_stage, ds_json, cfg.seed, cfg.init_from, peft_cfg)
        parts = TrainerParts(
            model=model,
            model_cfg=model_cfg,
            objective=make_objective(obj_cfg, model_cfg),
            reader=reader,
            dist=info,
            preemption=preemption,
            validator=validator,
        )
        cfgs = LoopConfigs(
            trainer=trainer_cfg,
            optim=optim_cfg,
            schedule=OmegaConf.to_object(cfg.schedule),
            logging=OmegaConf.to_object(cfg.logging),
        )
        run = RunContext(run_dir, cfg.seed, tokenizer_path, to_container(cfg))
        return Trainer(parts, cfgs, ds_json, run).fit()
    except LladaError as exc:
        _fail(exc, info.rank, info.world_size, after_setup=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
