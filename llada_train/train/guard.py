"""The non-finite guard: per-step device sums, one agreement across ranks, skip and halt.

The unit skipped is a whole optimizer step. Backward has already run on every micro-batch
of the accumulation window when the step is decided, and a non-finite loss poisons the
gradients of the whole window, so its finite micro-batches are dropped with it and the step
is redone on fresh batches. Deciding once per step keeps host syncs out of the micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llada_train.errors import LladaError
from llada_train.train.distributed import all_ranks_sum


class StepSums:
    """What the micro-batches of one optimizer step add up, kept on the device (no syncs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0  # host ints: the objective reports shapes, which need no sync
        self.micro_batches = 0
        self.metrics: dict[str, torch.Tensor] = {}  # the objective's own (LossOutput.metrics)

    def add(
        self, loss: torch.Tensor, tokens: int, metrics: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Add one micro-batch's (detached) loss, token count and objective metrics."""
        loss = loss.detach().to(torch.float64)
        self.nonfinite += (~torch.isfinite(loss)).to(torch.float64)
        self.loss += loss
        self.tokens += tokens
        self.micro_batches += 1
        for k, v in (metrics or {}).items():
            total = self.metrics.get(k, torch.zeros((), dtype=torch.float64, device=self.device))
            self.metrics[k] = total + v.detach().to(torch.float64)

    def flag_nonfinite(self, value: torch.Tensor) -> None:
        """Also fail the step when ``value`` (e.g. a gradient norm) is not finite."""
        self.nonfinite += (~torch.isfinite(value.detach())).to(torch.float64).sum()

    def agree(self, stop_requested: bool) -> StepVerdict:
        """One all-reduce over ranks and one copy to the host for the whole optimizer step."""
        stop = torch.tensor(float(stop_requested), dtype=torch.float64, device=self.device)
        counts = torch.tensor(
            [float(self.tokens), float(self.micro_batches)], dtype=torch.float64, device=self.device
        )
        keys = sorted(self.metrics)  # the same keys on every rank (LossOutput.metrics' rule)
        extra = [self.metrics[k] for k in keys]
        vec = all_ranks_sum(
            torch.cat([torch.stack([self.nonfinite, self.loss, stop, *extra]), counts])
        )
        nonfinite, loss, stop_sum, *sums, tokens, micro = vec.tolist()
        return StepVerdict(
            nonfinite=nonfinite > 0,
            mean_loss=loss / max(micro, 1.0),
            tokens=tokens,
            stop_requested=stop_sum > 0,
            metrics={k: v / max(micro, 1.0) for k, v in zip(keys, sums, strict=True)},
        )


@dataclass
class StepVerdict:
    """The step's totals as every rank agreed them."""

    nonfinite: bool  # a loss or the gradient norm was not finite on some rank
    mean_loss: float  # mean micro-batch loss over all ranks
    tokens: float  # tokens seen by all ranks together
    stop_requested: bool  # some rank received a pre-emption signal
    # the objective's metrics, each a mean over the step's micro-batches on all ranks
    metrics: dict[str, float] = field(default_factory=dict)


class BadStepCounter:
    """Counts skipped steps; ``max_in_a_row`` consecutive ones stop the run."""

    def __init__(self, max_in_a_row: int, skipped: int = 0) -> None:
        self.max_in_a_row, self.skipped, self.in_a_row = max_in_a_row, skipped, 0

    def record(self, bad: bool, step: int) -> None:
        """Note one attempted step; raises after ``max_in_a_row`` bad ones in a row."""
        if not bad:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise LladaError(
                f"{self.in_a_row} non-finite steps in a row after step {step}: stopping "
                "(lower the learning rate or inspect the data); the last checkpoint is intact"
            )
