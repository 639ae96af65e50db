"""DeepSpeed checkpoints plus trainer state, an atomic ``latest`` pointer, and exports."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llada_train.atomic import fsync_dir, write_bytes_atomic, write_json_atomic, write_text_atomic
from llada_train.errors import LladaError
from llada_train.model import lora
from llada_train.model.checkpoint import named_weights, save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.train.distributed import all_ranks_any
from llada_train.train.manifest import record_manifest, verify_manifest
from llada_train.train.safe_load import check_pickles, torch_load, weights_only_loads

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
PARTIAL = ".partial_"  # prefix of a step folder still being written (never named by latest)
LORA_STATE = "lora.json"  # a LoRA run's adapter settings: resume must agree with them


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


def check_resume_world_size(run_dir: str | Path, tag: str, world: int) -> dict[str, Any]:
    """``tag``'s trainer state, after refusing a world size it cannot resume on. Reads one
    JSON file: the entry points run it before any process group, and resume again."""
    state_file = checkpoint_dir(run_dir) / tag / TRAINER_STATE
    try:
        trainer_state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LladaError(
            f"{state_file} cannot be read ({exc}): the checkpoint is damaged; point "
            f"{checkpoint_dir(run_dir) / LATEST} at an older complete step"
        ) from exc
    saved = int(trainer_state.get("world_size", world))
    # the reader's position is global and keyed masks do not depend on the rank, so only
    # optimizer state partitioned by rank (ZeRO 1-3) ties a checkpoint to its world size
    movable = trainer_state.get("mask_draws") == "seed-step-index" and int(
        trainer_state.get("zero_stage", 0)) == 0
    if saved != world and not movable:
        raise LladaError(
            f"{state_file.parent} was written by {saved} ranks but this job has {world}: resume "
            "with the same number of ranks (ZeRO-1/2/3 keep optimizer state partitioned by rank; "
            "a ZeRO-0 checkpoint with keyed masks may change it)"
        )
    return trainer_state


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_writer_error(exc: RuntimeError) -> bool:
    return any(s in str(exc) for s in ("inline_container", "PytorchStreamWriter", "file write failed"))


def _write_error(where: Path, exc: OSError | RuntimeError) -> LladaError:
    if isinstance(exc, RuntimeError):  # torch's writer does not say why: name the usual cause
        exc = OSError(errno.ENOSPC, "write failed, is the disk full?", str(where))
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the run directory writable or choose another run_dir"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space (or lower trainer.keep_last) and resume"
    else:
        fix = "check the file system of run_dir and resume"
    return LladaError(
        f"cannot write checkpoint {where} ({reason}: {exc.filename or where}): {fix}; "
        "no partial checkpoint was kept and the previous one is intact"
    )


def save_checkpoint(
    engine: Any,
    run_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank writes its shard and its own state; rank 0 moves ``latest`` last.

    The step folder is written as ``.partial_<tag>``, digested into ``manifest.json`` and
    only then renamed to ``<tag>``; ``latest`` moves after that. A killed or failed save
    never leaves a half-written step folder, and a job killed mid-save resumes from the
    previous checkpoint. A LoRA run saves its adapters only (the frozen base is re-read from
    ``init_from`` on resume) plus ``lora.json``.
    """
    root = checkpoint_dir(run_dir)
    tag = step_tag(step)
    partial = root / f"{PARTIAL}{tag}"
    rank, world = _rank_world()
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        _barrier()
        is_lora = lora.is_lora(getattr(engine, "module", None))
        # LoRA: the module state holds the adapters only (the frozen base is init_from's)
        frozen = {"exclude_frozen_parameters": True} if is_lora else {}
        engine.save_checkpoint(str(root), tag=partial.name, save_latest=False, **frozen)
        buffer = io.BytesIO()
        torch.save(rank_state, buffer)
        write_bytes_atomic(partial / f"rank_state_{rank:05d}.pt", buffer.getvalue())
        if rank == 0:
            write_json_atomic(partial / TRAINER_STATE, trainer_state)
            if is_lora:
                write_json_atomic(partial / LORA_STATE, lora.signature(engine.module))
        _barrier()
        record_manifest(partial, rank, world, _barrier)
        if rank == 0:
            _publish(root, partial, tag)
            _prune(root, keep_last)
    except (OSError, RuntimeError) as exc:
        # torch's zip writer reports a full disk as RuntimeError("[enforce fail at inline_container")
        if isinstance(exc, RuntimeError) and not _is_writer_error(exc):
            raise
        # other ranks block in a collective until the launcher ends them on this rank's exit
        shutil.rmtree(partial, ignore_errors=True)
        raise _write_error(root / tag, exc) from None
    _barrier()
    return root / tag


def _publish(root: Path, partial: Path, tag: str) -> None:
    """Rename the complete ``partial`` folder to ``tag``, then point ``latest`` at it."""
    final = root / tag
    if final.exists():  # a step saved again after a resume from an older checkpoint
        old = root / f"{PARTIAL}old_{tag}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    fsync_dir(root)  # the rename is durable before latest names it
    write_text_atomic(root / LATEST, tag)


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[: max(0, len(tags) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{PARTIAL}*"):  # folders of saves that were killed
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(engine: Any, run_dir: str | Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine, optimizer and this rank's state from ``tag``.

    Every file is checked against the step's ``manifest.json`` first (collective) for
    corruption; every file, DeepSpeed's included, then unpickles weights-only (``safe_load``).
    """
    root = checkpoint_dir(run_dir)
    rank, world = _rank_world()
    trainer_state = check_resume_world_size(run_dir, tag, world)
    saved = int(trainer_state.get("world_size", world))
    verify_manifest(root / tag, rank, world, getattr(engine, "device", None))
    check_pickles(root / tag, rank, world, getattr(engine, "device", None))  # all ranks refuse together
    is_lora = _check_lora_matches(getattr(engine, "module", None), root / tag)
    # a LoRA checkpoint holds the adapters only: the frozen base came from init_from
    with weights_only_loads(root / tag):  # DeepSpeed asks for weights_only=False: overridden
        try:
            load_path, _ = engine.load_checkpoint(
                str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False,
                load_module_strict=not is_lora,
            )
        except RuntimeError as exc:
            # every rank reads its own file, so every rank stops here with the same line
            if "size mismatch" in str(exc) and "expert_bias" in str(exc):
                raise _old_expert_bias_error(run_dir, root / tag) from None
            raise
    if load_path is None:
        raise LladaError(f"DeepSpeed could not load checkpoint {root / tag}")
    rank_state = load_rank_state(root / tag / f"rank_state_{min(rank, saved - 1):05d}.pt")
    if saved != world:  # per-rank random streams do not carry over to another topology
        rank_state.pop("generator", None)
        rank_state.pop("torch_rng", None)
    return trainer_state, rank_state


def _old_expert_bias_error(run_dir: str | Path, step_dir: Path) -> LladaError:
    # written when the bias was a parameter: ZeRO-3 saved it as partitions, not a whole tensor
    return LladaError(
        f"{step_dir} holds the MoE expert biases as ZeRO-3 partitions (written before they "
        f"became fp32 buffers) and cannot be resumed: run llada-export --run-dir {run_dir} "
        "--out DIR and start a new run with init_from=DIR"
    )


def _check_lora_matches(module: torch.nn.Module | None, step_dir: Path) -> bool:
    """Refuse to resume a LoRA checkpoint without the same adapters and base, or a full one
    with adapters (a non-strict load would silently skip what does not match)."""
    saved_path = step_dir / LORA_STATE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    live = lora.signature(module) if lora.is_lora(module) else None

    def describe(sig: dict[str, Any] | None) -> str:
        return "peft=none" if sig is None else f"peft=lora r={sig['r']} alpha={sig['alpha']}"

    fix = "keep the run's peft settings and init_from base, or start a new run_dir"
    if (saved is None) != (live is None):
        raise LladaError(f"{step_dir} was written with {describe(saved)} but this run has "
                         f"{describe(live)}: {fix}")
    if saved is None or live is None:
        return False
    # the base's path may move; its fingerprint may not
    differ = [k for k in ("r", "alpha", "target_modules", "base_fingerprint") if saved.get(k) != live[k]]
    if differ:
        raise LladaError(f"{step_dir} was written with {describe(saved)} but this run has "
                         f"{describe(live)} (differing: {', '.join(differ)}): {fix}")
    return True


def load_rank_state(path: Path) -> dict[str, Any]:
    """A rank's reader/RNG state, unpickled weights-only (tensors and plain Python values)."""
    return torch_load(path, map_location="cpu")


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
    """Full fp32 weights on every rank (ZeRO-3 partitions gathered one parameter at a time);
    the persistent buffers (fp32 expert biases) are whole on every rank and copied as they are."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, p in named_weights(module):
        partitioned = zero_stage == 3 and hasattr(p, "ds_id")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=partitioned):
            out[name] = p.detach().float().cpu().clone()
    return out


def gather_adapter_state(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """A LoRA model's adapter tensors (peft key names), gathered on every rank."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if not lora.is_adapter_param(name):
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=zero_stage == 3):
            out[lora.to_peft_key(name)] = p.detach().float().cpu().clone()
    return out


def adapter_dir(out_dir: Path) -> Path:
    """Where a LoRA run's end-of-run adapter folder goes: beside the merged export."""
    return out_dir.parent / "adapter"


def export_from_engine(
    engine: Any, zero_stage: int, model_cfg: ModelConfig, out_dir: Path, tokenizer: str | None
) -> None:
    """Collective: consolidate the live model and let rank 0 write the released layout.

    A LoRA run writes its adapter folder (``adapter_dir(out_dir)``) and, in ``out_dir``, the
    base from ``init_from`` with the adapters merged by peft (a plain released layout).
    """
    if lora.is_lora(engine.module):
        state = gather_adapter_state(engine.module, zero_stage)
        if not dist.is_initialized() or dist.get_rank() == 0:
            folder = lora.save_adapter(
                state, lora.live_config(engine.module), adapter_dir(out_dir), tokenizer
            )
            merged = lora.load_merged(lora.live_config(engine.module).base_model_name_or_path,
                                      lora.read_adapter(folder))
            weights = {n: p.detach() for n, p in named_weights(merged)}
            save_pretrained(weights, model_cfg, out_dir, tokenizer_dir=tokenizer)
        _barrier()
        return
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
    if not (root / tag / TRAINER_STATE).is_file():
        raise LladaError(f"{root / tag / TRAINER_STATE} not found: pick a complete checkpoint with --tag")
    state = json.loads((root / tag / TRAINER_STATE).read_text())
    verify_manifest(root / tag)  # corruption; weights-only loading stops forged files
    if state["zero_stage"] == 0:
        # stage 0 writes no ZeRO shards: the module state is complete in the model file
        files = sorted((root / tag).glob("mp_rank_*_model_states.pt"))
        blob = torch_load(files[0], map_location="cpu")
        return {k: v.float() for k, v in blob["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(root / tag):  # zero_to_fp32 asks for weights_only=False: overridden
        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return {k: v.float() for k, v in sd.items()}
