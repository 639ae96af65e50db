"""DeepSpeed checkpoints plus trainer state, an atomic ``latest`` pointer, and exports."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llada_train.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from llada_train.errors import LladaError
from llada_train.model.checkpoint import save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.train.distributed import all_ranks_any

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag named by ``checkpoints/latest``, or None for a fresh run."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag / TRAINER_STATE).exists():
        raise LladaError(
            f"{pointer} names {tag!r} but {checkpoint_dir(run_dir) / tag / TRAINER_STATE} is missing: "
            "restore that checkpoint or point 'latest' at an older complete one"
        )
    return tag


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank writes its shard and its own state; rank 0 moves ``latest`` last.

    ``latest`` only ever names a checkpoint whose files are all on disk, so a job killed
    mid-save resumes from the previous one.
    """
    root = checkpoint_dir(run_dir)
    tag = step_tag(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    buffer = io.BytesIO()
    torch.save(rank_state, buffer)
    write_bytes_atomic(root / tag / f"rank_state_{rank:05d}.pt", buffer.getvalue())
    _barrier()
    if rank == 0:
        write_json_atomic(root / tag / TRAINER_STATE, trainer_state)
        write_text_atomic(root / LATEST, tag)
        _prune(root, keep_last)
    _barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[: max(0, len(tags) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: Any, run_dir: str | Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine, optimizer and this rank's state from ``tag``."""
    root = checkpoint_dir(run_dir)
    trainer_state = json.loads((root / tag / TRAINER_STATE).read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if trainer_state.get("world_size") != world:
        raise LladaError(
            f"{root / tag} was written by {trainer_state.get('world_size')} ranks but this job has "
            f"{world}: resume with the same number of ranks (or start a new run_dir with init_from)"
        )
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise LladaError(f"DeepSpeed could not load checkpoint {root / tag}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_state = torch.load(root / tag / f"rank_state_{rank:05d}.pt", weights_only=True)
    return trainer_state, rank_state


def parameters_finite(engine: Any, device: torch.device) -> bool:
    """True when every rank's (partition of the) weights is finite."""
    bad = False
    for p in engine.module.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p
        if not torch.isfinite(local.detach()).all():
            bad = True
            break
    return not all_ranks_any(bad, device)


def gather_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (ZeRO-3 partitions gathered one parameter at a time)."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().float().cpu().clone()
        else:
            out[name] = p.detach().float().cpu().clone()
    return out


def export_from_engine(
    engine: Any, zero_stage: int, model_cfg: ModelConfig, out_dir: Path, tokenizer: str | None
) -> None:
    """Collective: consolidate the live model and let rank 0 write the released layout."""
    state = gather_state_dict(engine.module, zero_stage)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_pretrained(state, model_cfg, out_dir, tokenizer_dir=tokenizer)
    _barrier()


def consolidate_checkpoint(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a saved checkpoint of any ZeRO stage, offline (one process)."""
    root = checkpoint_dir(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise LladaError(f"no checkpoint in {root}: train first, or pass --tag")
    state = json.loads((root / tag / TRAINER_STATE).read_text())
    if state["zero_stage"] == 0:
        # stage 0 writes no ZeRO shards: the module state is complete in the model file
        files = sorted((root / tag).glob("mp_rank_*_model_states.pt"))
        blob = torch.load(files[0], map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return {k: v.float() for k, v in sd.items()}
