"""Weighted cross entropy of an LM head over selected rows, chunked so no (rows, V) fp32 exists.

The masked-diffusion losses need logits only at masked positions. ``masked_rows`` gathers
those rows of the final hidden states; ``chunked_head_ce`` then runs ``ln_f``, the head and
an fp32 cross entropy one chunk of rows at a time. Each chunk runs under non-reentrant
``torch.utils.checkpoint``: its logits are dropped after the forward and recomputed in
backward, so at most one chunk's logits (and their gradient) are alive at a time.

The head is always called as a module (``__call__``), never by reading ``ff_out.weight``:
under ZeRO-3 a parameter exists only inside its module's forward, where DeepSpeed's hooks
gather it. Each head call is then an all-gather, a collective, so under ZeRO-3 every rank
must run the same number of chunks: the count comes from an upper bound on the rows (the
batch's B * L, the same every pre-training step, so DeepSpeed's prefetch trace stays valid)
and is agreed across ranks with one all-reduce (MAX).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]  # (n, d) hidden rows -> (n, V) logits


def masked_rows(
    hidden: torch.Tensor,  # (B, L, d)
    targets: torch.Tensor,  # (B, L) int64
    masked: torch.Tensor,  # (B, L) bool
    row_weight: torch.Tensor,  # (B,) weight of every masked position of that row, or (B, L)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked positions as rows: hidden (R, d), targets (R,), fp32 weights (R,).

    ``row_weight`` is one weight per row, or (B, L) one per position (block diffusion's
    per-block t)."""
    B, L, d = hidden.shape
    # The one host sync of the loss: R (the number of masked positions) sizes the gathered
    # tensors, so `nonzero` must tell the host how many there are.
    idx = masked.reshape(-1).nonzero().squeeze(1)  # (R,)
    rows = hidden.reshape(B * L, d).index_select(0, idx)  # (R, d)
    tgt = targets.reshape(-1).index_select(0, idx)  # (R,)
    w = row_weight.to(torch.float32)
    w = w[:, None].expand(B, L) if w.dim() == 1 else w  # (B, L)
    w = w.reshape(-1).index_select(0, idx)  # (R,)
    return rows, tgt, w


class WeightedCE(torch.autograd.Function):
    """sum_r w_r * CE(logits_r, t_r) in fp32, whose gradient is made in forward.

    One fp32 (n, V) work buffer becomes ``w * (softmax - onehot)`` in place and is kept in
    the logits' dtype: no log-softmax is saved and backward allocates nothing of size V,
    so a chunk peaks at the logits plus one fp32 buffer (``F.cross_entropy`` keeps three).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x = logits.float()  # (n, V)
        if x.data_ptr() == logits.data_ptr():
            x = x.clone()  # fp32 logits: never write into the input
        t = targets[:, None]  # (n, 1)
        target_logit = x.gather(1, t)  # (n, 1)
        m = x.amax(dim=1, keepdim=True)  # (n, 1) shift for a stable log-sum-exp
        x.sub_(m).exp_()
        s = x.sum(dim=1, keepdim=True)  # (n, 1)
        loss = ((m + s.log() - target_logit).squeeze(1) * weights).sum()
        x.div_(s).scatter_add_(1, t, torch.full_like(target_logit, -1.0)).mul_(weights[:, None])
        ctx.save_for_backward(x.to(logits.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # in place: this graph is backpropagated once (checkpoint recomputes it otherwise)
        return grad.mul_(grad_out), None, None


def _chunk_ce(head: Head, rows: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return WeightedCE.apply(head(rows), tgt, w)  # head: (n, d) -> (n, V), the model dtype


def _zero3_param(head_module: torch.nn.Module | None) -> bool:
    return head_module is not None and any(hasattr(p, "ds_id") for p in head_module.parameters())


def agree_num_chunks(n: int, device: torch.device) -> int:
    """The largest chunk count of all ranks (one small all-reduce and host sync)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def chunked_head_ce(
    rows: torch.Tensor,  # (R, d) hidden rows (before ln_f)
    head: Head,
    targets: torch.Tensor,  # (R,)
    weights: torch.Tensor,  # (R,) fp32
    chunk_rows: int,
    head_module: torch.nn.Module | None = None,
    max_rows: int | None = None,
) -> torch.Tensor:
    """sum_r weights[r] * CE(head(rows[r]), targets[r]) in fp32, a 0-dim tensor.

    ``chunk_rows > 0``: chunks of at most that many rows, each recomputed in backward.
    ``chunk_rows == 0``: one chunk without recompute (fastest; the full (R, V) fp32 logits
    and their softmax stay alive until backward). ``head_module`` holds the head's
    parameters; when they are ZeRO-3 partitioned, the chunk count is ``max_rows / chunk_rows``
    (``max_rows`` >= R, default R) agreed by all ranks.
    With R = 0 the head still runs once on an empty batch, so every rank calls it (and
    produces its zero gradient) the same number of times.
    """
    R = rows.shape[0]
    if chunk_rows <= 0:
        return _chunk_ce(head, rows, targets, weights)
    n = max(1, math.ceil(R / chunk_rows))
    if _zero3_param(head_module):
        n = agree_num_chunks(max(n, math.ceil((max_rows or 0) / chunk_rows)), rows.device)
    size = math.ceil(R / n)
    total = rows.new_zeros((), dtype=torch.float32)
    for i in range(n):
        sl = slice(i * size, (i + 1) * size)  # empty past R on ranks with fewer rows
        # No randomness inside a chunk: skip the RNG state stash/restore per chunk.
        total = total + checkpoint(
            _chunk_ce, head, rows[sl], targets[sl], weights[sl],
            use_reentrant=False, preserve_rng_state=False,
        )
    return total
