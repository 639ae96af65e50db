"""The sample order shared by the pretrain and SFT readers, and its exact-resume state.

All ranks walk one global, infinite stream of sample positions 0, 1, 2, ... Position p
goes to a source (mixtures: a seeded hash of p against the cumulative weights) and gets
the next unused index k in that source; k selects item ``perm_e(k mod N)`` of epoch
``e = k // N``, ``perm_e`` a seeded permutation. Each step consumes ``B * world_size``
positions: rank r takes the r-th block of B. Dataloader worker w produces the steps
``j = w (mod num_workers)``, which is exactly the order torch's DataLoader hands batches
out in, so the batch sequence is the same for any worker count. Nothing is skipped at
epoch ends (a batch may straddle two epochs), hence every item is read exactly once per
epoch across all ranks and workers. The state is the position and per-source counters
reached, identical on every rank, so a run may resume with another batch or world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from llada_train.data.heldout import ValidationSource
from llada_train.errors import LladaError
from llada_train.keyed_random import derive_key, permute, uniform01


class Reader(Protocol):
    """What the training loop reads: batches forever, and a position it can save and restore."""

    def __next__(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class ReaderInfo:
    """What a reader builder learned about its data, returned beside the reader."""

    vocab_size: int  # ids the data may contain (largest over a mixture's sources)
    # records of a record dataset (SFT), what ``trainer.epochs`` counts; None for token streams
    num_records: int | None = None
    manifests: list[dict[str, Any]] = field(default_factory=list)  # one per source
    validation: ValidationSource | None = None  # held-out items, never in the reader's batches


def plan_steps(batch: int, world: int) -> int:
    """Steps planned per vectorised call: >= 4096 samples of this rank to amortise Python
    overhead, <= 2**20 global positions to bound memory."""
    return max(1, min(max(64, 4096 // batch), (1 << 20) // (batch * world)))


@dataclass
class StreamState:
    """Global sample position reached and how many samples each source has given so far."""

    position: int
    counters: list[int]


class Schedule:
    """Pure functions from global positions to (source, item index)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int) -> None:
        if any(n <= 0 for n in sizes):
            raise LladaError(f"data source with no items (sizes {sizes}): check the data paths")
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(sizes) or (w < 0).any() or w.sum() <= 0:
            raise LladaError(
                f"mixture weights {weights} must be non-negative with a positive sum, one per source"
            )
        self.sizes, self.seed = list(sizes), seed
        self.cum = np.cumsum(w / w.sum())
        self.cum[-1] = 1.0  # guard against float round-off sending u ~ 1 past the end
        self.mix_key = derive_key(seed, 0x4D4958)

    def assign(self, start: int, count: int) -> np.ndarray:
        """Source of each position in [start, start + count): (count,) int64."""
        if len(self.sizes) == 1:
            return np.zeros(count, dtype=np.int64)
        u = uniform01(np.arange(start, start + count, dtype=np.int64), self.mix_key)
        return np.searchsorted(self.cum, u, side="right").astype(np.int64)

    def items(self, src: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Item of source ``src`` for its k-th sample: epoch-wise permutation of the source."""
        out = np.empty_like(k)
        for s in np.unique(src):
            sel = src == s
            n = self.sizes[s]
            ks = k[sel]
            epochs, local = ks // n, ks % n
            res = np.empty_like(ks)
            for e in np.unique(epochs):  # at most two epochs inside one plan in practice
                m = epochs == e
                res[m] = permute(local[m], n, derive_key(self.seed, int(s), int(e)))
            out[sel] = res
        return out


@dataclass
class Plan:
    """``G`` consecutive steps: this rank's (source, item) per sample and the state after each step."""

    first_step: int  # index of the plan's first step since the walk's start
    src: np.ndarray | None  # (G, B) source of each of this rank's samples
    items: np.ndarray | None  # (G, B) item index within that source
    position: int  # global position before the plan
    step: int  # positions per step (B * world)
    after: np.ndarray  # (G, S) per-source counters after each step

    def state(self, g: int) -> StreamState:
        """The stream state after step ``g`` of the plan."""
        return StreamState(self.position + (g + 1) * self.step, self.after[g].tolist())


def walk(
    sched: Schedule, state: StreamState, batch: int, world: int, rank: int | None
) -> Iterator[Plan]:
    """Plans of ``plan_steps`` steps from ``state`` on, forever; items only when ``rank`` is given."""
    pos, counters = state.position, np.asarray(state.counters, dtype=np.int64)
    n_src, step, G = len(sched.sizes), batch * world, plan_steps(batch, world)
    sl = slice(0 if rank is None else rank * batch, 0 if rank is None else (rank + 1) * batch)
    first = 0
    while True:
        r_src = r_items = None
        if n_src == 1:  # fast path: the k-th position is the source's k-th sample
            after = counters + step * np.arange(1, G + 1)[:, None]  # (G, 1)
            if rank is not None:
                k = counters[0] + np.arange(G * step, dtype=np.int64).reshape(G, step)[:, sl]
                r_src = np.zeros_like(k)  # (G, B)
                r_items = sched.items(r_src.reshape(-1), k.reshape(-1)).reshape(G, batch)
        else:
            src = sched.assign(pos, G * step).reshape(G, step)  # (G, B*W)
            onehot = src[..., None] == np.arange(n_src)  # (G, B*W, S)
            after = counters + np.cumsum(onehot.sum(axis=1), axis=0)  # (G, S) after each step
            if rank is not None:
                # index of each position within its source: counters + earlier same-source ones
                flat = onehot.reshape(G * step, n_src)
                before = np.cumsum(flat, axis=0).reshape(G, step, n_src) - onehot  # (G, B*W, S)
                k = np.take_along_axis(counters + before, src[..., None], axis=2)[..., 0]
                r_src = src[:, sl]  # (G, B)
                r_items = sched.items(r_src.reshape(-1), k[:, sl].reshape(-1)).reshape(G, batch)
        yield Plan(first, r_src, r_items, pos, step, after)
        pos, counters, first = pos + G * step, after[-1], first + G


class _WorkerStream(torch.utils.data.IterableDataset):
    """The steps owned by one dataloader worker (all steps when there are no workers).

    ``fetch(src (g, B), items (g, B))`` yields the g batches, reading several per call so
    per-batch Python overhead is paid once per chunk.
    """

    def __init__(
        self, fetch, sched: Schedule, state: StreamState, batch: int, world: int, rank: int
    ) -> None:
        super().__init__()
        self.fetch, self.sched, self.state = fetch, sched, state
        self.batch, self.world, self.rank = batch, world, rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for plan in walk(self.sched, self.state, self.batch, self.world, self.rank):
            mine = [g for g in range(len(plan.after)) if (plan.first_step + g) % nw == wid]
            if not mine:
                continue
            for g, batch in zip(mine, self.fetch(plan.src[mine], plan.items[mine]), strict=True):
                # each row's global stream position: what the masks are derived from, so they
                # do not depend on how the global batch is split over ranks and micro-batches
                first = plan.position + g * plan.step + self.rank * self.batch
                yield {**batch, "sample_index": torch.arange(first, first + self.batch)}


class StreamReader:
    """Infinite batch iterator with ``state_dict``/``load_state_dict`` for exact resume."""

    def __init__(
        self,
        fetch: Callable[[np.ndarray, np.ndarray], Iterator[dict[str, torch.Tensor]]],
        sizes: list[int],
        weights: list[float],
        batch: int,
        seed: int,
        rank: int,
        world: int,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        identity: dict[str, Any] | None = None,
    ) -> None:
        if not 0 <= rank < world:
            raise LladaError(f"data reader: rank {rank} is outside world size {world}")
        if batch <= 0:
            raise LladaError(f"data reader: micro batch size {batch} must be positive")
        self.sched = Schedule(sizes, weights, seed)
        self.fetch, self.batch, self.rank, self.world = fetch, batch, rank, world
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        # what a saved state must agree with (the data and the order), not batch or world size
        self.identity = {
            "seed": seed,
            "sizes": list(sizes),
            "weights": list(weights),
            **(identity or {}),
        }
        self._reset(StreamState(0, [0] * len(sizes)))

    def _reset(self, state: StreamState) -> None:
        self._start = state
        self._it: Iterator[dict[str, torch.Tensor]] | None = None
        self._tracker: Iterator[Plan] | None = None
        self._plan: Plan | None = None  # plan holding the last returned step, and its index
        self._g = -1

    def _open(self) -> None:
        ds = _WorkerStream(self.fetch, self.sched, self._start, self.batch, self.world, self.rank)
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
            )
            self._it = iter(loader)
        else:
            self._it = iter(ds)
        # the main process follows the state without reading data
        self._tracker = walk(self.sched, self._start, self.batch, self.world, None)

    def __iter__(self) -> StreamReader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._open()
        out = next(self._it)
        self._g += 1
        if self._plan is None or self._g == len(self._plan.after):
            self._plan, self._g = next(self._tracker), 0
        return out

    @property
    def _state(self) -> StreamState:
        return self._start if self._plan is None else self._plan.state(self._g)

    @property
    def epoch(self) -> int:
        """Complete passes made over every source (the least-advanced source counts)."""
        return min(c // n for c, n in zip(self._state.counters, self.sched.sizes, strict=True))

    @property
    def position(self) -> int:
        """Global samples consumed by all ranks together."""
        return self._state.position

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream after the batches returned so far."""
        return {
            "version": 1,
            "position": self._state.position,
            "counters": list(self._state.counters),
            **self.identity,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a saved ``state_dict``: the next batches equal an uninterrupted run's."""
        diff = [k for k in self.identity if d.get(k) != self.identity[k]]
        if diff:
            raise LladaError(
                f"data reader state does not match this data/seed (differs in: {', '.join(diff)}): "
                "resume with the same data and seed, or start the data stream afresh"
            )
        self.close()
        self._reset(StreamState(int(d["position"]), [int(c) for c in d["counters"]]))

    def close(self) -> None:
        """Stop dataloader workers; a later ``next`` restarts them at the current position."""
        it, state = self._it, self._state
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._reset(state)
