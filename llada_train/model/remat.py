"""Activation checkpointing of blocks: full recompute, or keep the matmul outputs (selective).

``full`` stores only each checkpointed block's input and reruns the whole block in
backward. ``save_matmuls`` stores the outputs of the matmuls and of attention (the
expensive ops) and recomputes the cheap element-wise ones (norms, RoPE, SiLU, products):
most of the memory saving of elementwise fusion at a fraction of full recompute's cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import checkpoint as ckpt

from llada_train.errors import LladaError

POLICIES = ("full", "save_matmuls")
HAS_SELECTIVE = hasattr(ckpt, "create_selective_checkpoint_contexts")


def _expensive_ops() -> set[Any]:
    """The aten ops whose outputs ``save_matmuls`` keeps (the SDPA kernels differ by device)."""
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )  # fmt: skip
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


_SAVED_OPS = _expensive_ops()


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective-checkpoint policy: keep matmul and attention outputs, recompute the rest."""
    if op in _SAVED_OPS:
        return ckpt.CheckpointPolicy.MUST_SAVE
    return ckpt.CheckpointPolicy.PREFER_RECOMPUTE


def check_policy(policy: str) -> None:
    """Raise a clear error for an unknown policy or one this torch cannot run."""
    if policy not in POLICIES:
        raise LladaError(f"model config: checkpoint_policy={policy!r}; use one of {list(POLICIES)}")
    if policy != "full" and not HAS_SELECTIVE:
        raise LladaError(
            f"model config: checkpoint_policy={policy!r} needs torch's selective checkpointing "
            f"(torch >= 2.4); this torch is {torch.__version__}"
        )


def checkpointed_call(fn: Callable[..., torch.Tensor], policy: str, *args: Any) -> torch.Tensor:
    """``fn(*args)`` under non-reentrant activation checkpointing with ``policy``."""
    if policy == "full":
        return ckpt.checkpoint(fn, *args, use_reentrant=False)
    context_fn = functools.partial(ckpt.create_selective_checkpoint_contexts, _save_matmuls)
    return ckpt.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)
