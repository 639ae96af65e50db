"""The optimizer: AdamW with decay on matrices only, and a switch to skip one update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class OptimConfig:
    """AdamW; weight decay applies to matrices only (not norm weights)."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only (LoRA: the adapters); weight decay on matrices only, norm
    weights (1-D) are not decayed. An empty group is left out (DeepSpeed's ZeRO flattening
    does not take one)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    # ZeRO-3 parameters are partitioned to 1-D storage: their shape is ds_shape
    ndim = [len(getattr(p, "ds_shape", p.shape)) for p in trainable]
    decay = [p for p, n in zip(trainable, ndim, strict=True) if n >= 2]
    no_decay = [p for p, n in zip(trainable, ndim, strict=True) if n < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose ``step`` does nothing while ``skip`` is set.

    DeepSpeed calls the client optimizer at the accumulation boundary (once, or once per
    ZeRO parameter group / sub-group); setting ``skip`` around ``engine.step()`` drops that
    update on every ZeRO stage while DeepSpeed still advances its counters and clears the
    gradients. No moment, step count or weight-decay change happens on a skipped step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.skip:
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> SkippableAdamW:
    """The client optimizer handed to DeepSpeed.

    A torch AdamW avoids DeepSpeed's fused_adam JIT compile and works on CPU.
    """
    return SkippableAdamW(
        param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
