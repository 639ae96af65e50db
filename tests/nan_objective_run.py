"""Test-only entry: ``llada-pretrain`` whose objective turns chosen micro-batches non-finite.

    torchrun --nproc_per_node 2 -m tests.nan_objective_run --nan-loss-at 3,4 run_dir=... ...

``--nan-loss-at`` makes the loss NaN on those micro-batches (this rank's 1-based count);
``--nan-grad-at`` keeps the loss finite but makes its gradient NaN (a finite loss whose
backward overflows). Everything else is the real entry point and its Hydra overrides.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from llada_train.cli.common import default_objective, run_training
from llada_train.cli.entry import hydra_entry
from llada_train.cli.pretrain import pretrain_reader
from llada_train.diffusion import ObjectiveConfig
from llada_train.model.config import ModelConfig
from llada_train.train.parts import Objective, ObjectiveOutput


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return grad * float("nan")


class NonFiniteObjective:
    """Wraps an objective; poisons the loss or its gradient on chosen calls of this rank."""

    def __init__(self, inner: Objective, nan_loss_at: set[int], nan_grad_at: set[int]) -> None:
        self.inner, self.nan_loss_at, self.nan_grad_at = inner, nan_loss_at, nan_grad_at
        self.calls = 0

    def __call__(self, model, batch, generator) -> ObjectiveOutput:
        out = self.inner(model, batch, generator)
        self.calls += 1
        if self.calls in self.nan_loss_at:
            return replace(out, loss=out.loss * float("nan"))
        if self.calls in self.nan_grad_at:
            return replace(out, loss=_NaNGradient.apply(out.loss))
        return out


def _take(flag: str) -> set[int]:
    """Remove ``flag N,M`` from argv (Hydra must not see it); the set of N, M."""
    if flag not in sys.argv:
        return set()
    i = sys.argv.index(flag)
    value = sys.argv[i + 1]
    del sys.argv[i : i + 2]
    return {int(v) for v in value.split(",") if v}


def main() -> None:
    nan_loss_at, nan_grad_at = _take("--nan-loss-at"), _take("--nan-grad-at")

    def objective(cfg: ObjectiveConfig, model_cfg: ModelConfig) -> Objective:
        return NonFiniteObjective(default_objective(cfg, model_cfg), nan_loss_at, nan_grad_at)

    hydra_entry("pretrain", lambda cfg: run_training(cfg, pretrain_reader, objective))()


if __name__ == "__main__":
    main()
