"""Process-group setup and the DeepSpeed config rendered from the Hydra ``deepspeed/`` group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llada_train.errors import LladaError


@dataclass
class DeepSpeedConfig:
    """ZeRO settings; the DeepSpeed JSON is derived from this, never kept by hand."""

    zero_stage: int = 0
    offload_optimizer: bool = False  # ZeRO-2/3: optimizer states in CPU memory
    offload_param: bool = False  # ZeRO-3: parameters in CPU memory
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    # ZeRO-3: gathered parameters stay live while fewer than max_live_parameters elements are
    # gathered and their next use is within max_reuse_distance elements (DeepSpeed's 1e9 keeps a
    # whole <0.5B model gathered from forward to backward)
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    # ZeRO-3: the optimizer steps over the partition in sub-groups of this many elements; each
    # step makes fp32 temporaries (flattened gradient, Adam denominator) of one sub-group's size
    sub_group_size: int = 1_000_000_000
    # gradient accumulation dtype: null = DeepSpeed's default (the model's dtype); "fp32" keeps
    # bf16 runs from summing micro-batch gradients in bf16 (needs zero_stage >= 1 with bf16)
    grad_accum_dtype: str | None = None


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Join the job's process group (one process alone when no launcher set RANK).

    Uses DeepSpeed's comm init so torchrun, the deepspeed launcher and srun all work; the
    backend is NCCL on GPU and gloo on CPU.
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    if not dist.is_initialized():
        if device.type == "cpu":
            # DeepSpeed JIT-compiles its shared-memory all-reduce op (~90 s on 2 cores) at every
            # CPU start in a new environment; it serves only DeepSpeed-inference all-reduce,
            # while training's collectives go through torch.distributed (gloo)
            ops = getattr(deepspeed.ops, "__compatible_ops__", None)
            if isinstance(ops, dict):
                ops["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """global = micro x world x accumulation; numbers that do not divide are a start-up error."""
    per_step = micro_batch * world_size
    if micro_batch < 1 or global_batch < 1 or global_batch % per_step:
        raise LladaError(
            f"trainer.global_batch_size={global_batch} is not a multiple of "
            f"trainer.micro_batch_size={micro_batch} x world size {world_size} = {per_step}: "
            f"pick a global batch divisible by {per_step}"
        )
    return global_batch // per_step


def render_deepspeed_config(
    cfg: DeepSpeedConfig,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    grad_clip: float,
    bf16: bool,
) -> dict[str, Any]:
    """The DeepSpeed JSON for this run."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise LladaError(f"deepspeed.zero_stage={cfg.zero_stage}; use 0, 1, 2 or 3")
    if cfg.offload_param and cfg.zero_stage != 3:
        raise LladaError("deepspeed.offload_param needs deepspeed.zero_stage=3")
    if cfg.offload_optimizer and cfg.zero_stage < 2:
        raise LladaError("deepspeed.offload_optimizer needs deepspeed.zero_stage=2 or 3")
    if cfg.grad_accum_dtype not in (None, "fp32"):
        raise LladaError(f"deepspeed.grad_accum_dtype={cfg.grad_accum_dtype!r}; use null or fp32")
    # DeepSpeed has no stage-0 path for bf16 weights with fp32 accumulation (NotImplementedError)
    if bf16 and cfg.grad_accum_dtype == "fp32" and cfg.zero_stage == 0:
        raise LladaError(
            "deepspeed.grad_accum_dtype=fp32 with bf16 needs deepspeed.zero_stage >= 1"
        )
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(
            overlap_comm=cfg.overlap_comm,
            contiguous_gradients=cfg.contiguous_gradients,
            reduce_bucket_size=cfg.reduce_bucket_size,
        )
    if cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=cfg.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=cfg.stage3_param_persistence_threshold,
            stage3_max_live_parameters=cfg.stage3_max_live_parameters,
            stage3_max_reuse_distance=cfg.stage3_max_reuse_distance,
            sub_group_size=cfg.sub_group_size,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    rendered: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gradient_accumulation_steps(global_batch, micro_batch, world_size),
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer does its own logging
        "wall_clock_breakdown": False,
    }
    if cfg.grad_accum_dtype is not None:
        rendered["data_types"] = {"grad_accum_dtype": cfg.grad_accum_dtype}
    return rendered


def all_ranks_any(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (used to agree on skips and stops)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a small device tensor, in place; no host sync."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
