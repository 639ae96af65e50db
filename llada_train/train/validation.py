"""In-loop validation: a low-variance estimate of the SPEC §2 ELBO on held-out items.

The estimate is a function of the weights only. A fixed set of items is scored, each with
``samples_per_window`` noisy copies whose t values are stratified, ``t_k = (k + u_k) / S``,
and whose draws are hashes of (seed, item index, copy): every evaluation (on any number of
ranks) sees the same masks, so the curve moves only when the model does. It never touches
the training generators, torch's global RNG or the reader.

Per item i: ``l_i = mean_k sum_{masked j} CE_j / p_k / n_i`` (n_i scored tokens: the window,
or an SFT record's response), an unbiased estimate of the item's ELBO per token. The report
is ``mean_i l_i`` with standard error ``std(l_i) / sqrt(n)``: items are independent draws,
the copies inside one item are not, so the spread over items is the honest one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from llada_train.data.heldout import ValItem
from llada_train.diffusion.forward import mask_from_uniforms
from llada_train.diffusion.losses import masked_head_loss
from llada_train.errors import LladaError
from llada_train.keyed_random import derive_key, uniform01

_VAL = 0x56414C  # keeps the validation draws apart from any training stream


@dataclass
class ValidationConfig:
    """How often and how much: ``every`` steps, ``windows`` items x ``samples_per_window``."""

    every: int = 0  # optimizer steps between evaluations; 0 = off
    windows: int = 64  # held-out items scored (fewer if the pool is smaller)
    samples_per_window: int = 8  # stratified noisy copies of each item
    rows_per_forward: int = 16  # copies per forward call (the micro batch size)
    eps: float = 1e-3  # p = (1 - eps) t + eps, as in training
    seed: int = 0
    loss_chunk_rows: int = 1024  # the objective's head chunking

    def __post_init__(self) -> None:
        if self.every < 0 or self.samples_per_window < 1 or self.rows_per_forward < 1:
            raise LladaError(
                f"trainer.eval_every={self.every}, eval_samples_per_window="
                f"{self.samples_per_window}: use eval_every >= 0 and eval_samples_per_window >= 1"
            )


@dataclass
class ValidationResult:
    """ELBO per token (nats) over the items, its standard error, and the items scored."""

    loss: float
    loss_se: float
    items: int

    def metrics(self) -> dict[str, float]:
        """The logged keys: ``val_loss`` / ``val_loss_se`` in nats, ``val_bpt`` in bits."""
        ln2 = math.log(2.0)
        return {
            "val_loss": self.loss,
            "val_loss_se": self.loss_se,
            "val_bpt": self.loss / ln2,
            "val_bpt_se": self.loss_se / ln2,
        }


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (sample std with n - 1, over sqrt n); se is nan for one value."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


def item_draws(
    seed: int, item: int, samples: int, length: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probabilities (S,) with stratified t, and per-token uniforms (S, length), fixed
    by (seed, item): ``t_k = (k + u_k) / S`` puts one copy in each of S equal t-buckets."""
    u = uniform01(np.arange(samples, dtype=np.int64), derive_key(seed, _VAL, item, 0))
    t = (np.arange(samples) + u) / samples
    p = torch.from_numpy((1 - eps) * t + eps).float()  # (S,)
    cols = np.arange(length, dtype=np.int64)
    toks = np.stack([uniform01(cols, derive_key(seed, _VAL, item, 1, k)) for k in range(samples)])
    return p, torch.from_numpy(toks).float()  # (S,), (S, L)


class Validator:
    """Scores the fixed items on all ranks: item i goes to rank ``i % world``.

    Every rank makes the same number of forward calls (ZeRO-3 gathers parameters in each):
    a rank with fewer items scores item 0 again and drops the result.
    """

    def __init__(
        self,
        items: list[ValItem],
        cfg: ValidationConfig,
        mask_token_id: int,
        rank: int,
        world: int,
        device: torch.device,
        document_eos: int | None = None,  # set: attention within documents (packing)
    ) -> None:
        if not items:
            raise LladaError("validation: no held-out items; check data.val_path / val_fraction")
        self.items, self.cfg, self.mask_id = items, cfg, mask_token_id
        self.rank, self.world, self.device, self.eos = rank, world, device, document_eos
        self.max_len = max(len(ids) for ids, _ in items)
        self.per_rank = math.ceil(len(items) / world)

    def _score(self, model: torch.nn.Module, i: int) -> torch.Tensor:
        """l_i for item i as a 0-dim fp32 tensor, in ceil(S / rows) forward calls."""
        ids, prompt = self.items[i]
        S, rows = self.cfg.samples_per_window, self.cfg.rows_per_forward
        x = torch.as_tensor(ids, dtype=torch.long, device=self.device)  # (L,)
        L = x.numel()
        scored = max(L - prompt, 1)
        p, u = item_draws(self.cfg.seed, i, S, L, self.cfg.eps)
        maskable = (torch.arange(L, device=self.device) >= prompt)[None, :]  # (1, L)
        docs = None
        if self.eos is not None:
            eos = (x == self.eos).long()
            docs = (eos.cumsum(0) - eos)[None, :]  # (1, L): a new document after each EOS
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for a in range(0, S, rows):
            b = min(a + rows, S)
            x0 = x.expand(b - a, L)  # (r, L)
            noisy, masked = mask_from_uniforms(
                x0, p[a:b], u[a:b], self.mask_id, maskable.expand(b - a, L)
            )
            w = 1.0 / (p[a:b].to(self.device) * scored * S)  # (r,)
            d = None if docs is None else docs.expand(b - a, L)
            total = total + masked_head_loss(
                model, noisy, x0, masked, w, self.cfg.loss_chunk_rows, rows * self.max_len, d
            )
        return total

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> ValidationResult:
        """Evaluate in eval mode and restore the previous mode; every rank gets the result."""
        was_training = model.training
        model.eval()
        try:
            values = torch.zeros(len(self.items), dtype=torch.float64, device=self.device)
            for j in range(self.per_rank):
                i = self.rank + j * self.world
                loss = self._score(model, i if i < len(self.items) else 0)
                if i < len(self.items):
                    values[i] = loss.double()
            if self.world > 1 and dist.is_initialized():
                dist.all_reduce(values)  # each item is filled on exactly one rank
        finally:
            model.train(was_training)
        mean, se = mean_and_se(values.cpu().numpy())
        return ValidationResult(mean, se, len(self.items))
