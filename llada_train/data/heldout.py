"""Validation items: held-out windows or records, and the carve that keeps them from training.

``data.val_fraction`` keeps the last windows (pre-training, per source) or the last records
(SFT) out of the training stream: the reader then walks only the items before them, so no
training batch can contain a validation item. ``data.val_path`` names held-out data instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llada_train.errors import LladaError

# One validation item: its tokens (L,) and how many leading tokens are prompt (never masked).
ValItem = tuple[np.ndarray, int]


def carve_count(num_items: int, fraction: float, where: str) -> int:
    """Items of ``num_items`` kept for validation by ``data.val_fraction`` (>= 1 when > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise LladaError(f"data.val_fraction={fraction} for {where}; use 0 <= fraction < 1")
    if fraction == 0.0:
        return 0
    n = max(1, round(fraction * num_items))
    if n >= num_items:
        raise LladaError(
            f"data.val_fraction={fraction} leaves no training items in {where} ({num_items} items): "
            "lower it or set data.val_path"
        )
    return n


def spread(pool: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``range(pool)`` (all of them when ``n >= pool``)."""
    if n >= pool:
        return np.arange(pool, dtype=np.int64)
    # centres of n equal slices: deterministic, and they cover the pool's whole span
    return (np.arange(n, dtype=np.int64) * 2 + 1) * pool // (2 * n)


@dataclass
class ValidationSource:
    """A pool of ``size`` validation items; ``read(indices)`` returns them in that order."""

    size: int
    read: Callable[[np.ndarray], list[ValItem]]
    where: str  # for messages: the folder the items come from

    def take(self, n: int) -> list[ValItem]:
        """``n`` items spread evenly over the pool (fewer when the pool is smaller)."""
        if n < 1:
            raise LladaError(f"trainer.eval_windows={n}; use >= 1 (or trainer.eval_every=0)")
        return self.read(spread(self.size, n))
