"""A prefix key/value cache owned by the model (Fast-dLLM's block-wise cache, SPEC §7).

Attention is bidirectional, so cached prefix keys/values are exact only while the suffix
they were computed with is unchanged; a sampler that reuses them across steps accepts the
approximation knowingly (see ``llada_train.sample.fast``). Under causal or block-causal
attention earlier positions never see later ones, and the cache is exact
(``llada_train.sample.ar``, ``llada_train.sample.block``).
"""

from __future__ import annotations

import torch

from llada_train.errors import LladaError


class LayerKV:
    """One layer's slot: keys (after RoPE) and values of the first ``keep`` positions.

    A slot per layer, rather than a layer index into one cache, keeps compiled blocks
    sharing one graph (an index would be a per-block constant for torch.compile to guard on).
    """

    def __init__(self, keep: int, grow: bool = False) -> None:
        self.keep = keep
        self.grow = grow
        self.append = 0  # positions of the next filled pass to add to the prefix (append_next)
        self.k: torch.Tensor | None = None  # (B, H_kv, keep, hd)
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values to attend to, given the layer's own (B, H_kv, Ls, hd) ``k``, ``v``.

        Filled: the stored prefix followed by ``k``, ``v`` (kept as the new prefix when
        growing; its first ``append`` new positions kept after ``append_next``). Empty: ``k``,
        ``v`` unchanged, and their first ``keep`` positions are stored (copied, so the
        full-length tensors are not kept alive).
        """
        if self.k is not None and self.v is not None:
            n = k.shape[2]
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            if self.grow:  # autoregressive decoding: every pass extends the prefix
                self.k, self.v = k, v
            elif self.append:  # block decoding: a finished block joins the prefix, the rest not
                if self.append > n:
                    raise LladaError(
                        f"PrefixCache: append_next({self.append}) but the pass ran {n} positions"
                    )
                end = self.k.shape[2] + self.append
                self.k, self.v = k[:, :, :end].contiguous(), v[:, :, :end].contiguous()
                self.append = 0  # one pass only
            return k, v
        self.k = k[:, :, : self.keep].contiguous()
        self.v = v[:, :, : self.keep].contiguous()
        return k, v


class PrefixCache:
    """Per-layer keys (after RoPE) and values of the first ``keep`` positions of a sequence.

    Pass it to ``LLaDAModel.forward(..., cache=cache)``:

    - while empty, the model runs the whole sequence from position 0 and records the first
      ``keep`` positions' keys/values in every layer (the logits are the plain forward's);
    - once filled, the model runs only the given suffix, at absolute positions
      ``[length, length + Ls)``, attending to the cached prefix and to itself. The
      ``attention_mask`` then covers all keys, shape (B, length + Ls).

    With ``grow=True`` every filled pass appends its suffix to the cache (autoregressive
    decoding with a causal model, where earlier keys/values never change; see
    ``llada_train.sample.ar``). ``append_next(n)`` appends only the first ``n`` positions of
    the next filled pass (block decoding: the finished block runs once more together with the
    next, noisy block, and only the finished block's keys/values are kept; see
    ``llada_train.sample.block``).

    ``clear()`` empties it; a new ``PrefixCache`` per decoding block does the same.
    """

    def __init__(self, keep: int, grow: bool = False) -> None:
        if keep < 0:
            raise LladaError(f"PrefixCache: keep={keep} must be >= 0")
        self.keep = keep
        self.grow = grow
        self.layers: list[LayerKV] = []
        self.filled = False  # set by the model once a recording pass has run every layer
        # shift_logits models: the last cached position's final hidden state (B, 1, d)
        self.last_hidden: torch.Tensor | None = None

    def layer(self, i: int) -> LayerKV:
        """Layer ``i``'s slot, created when a recording pass first reaches it."""
        while len(self.layers) <= i:
            self.layers.append(LayerKV(self.keep, self.grow))
        return self.layers[i]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        """Per layer (B, H_kv, length, hd) keys after RoPE."""
        return [slot.k for slot in self.layers]

    @property
    def values(self) -> list[torch.Tensor | None]:
        """Per layer (B, H_kv, length, hd) values."""
        return [slot.v for slot in self.layers]

    @property
    def length(self) -> int:
        """Positions held: the offset of the suffix a filled cache expects (0 when empty)."""
        k = self.layers[0].k if self.filled and self.layers else None
        return 0 if k is None else k.shape[2]

    def append_next(self, n: int) -> None:
        """Make the next filled pass add its first ``n`` positions to the prefix (0: none).

        Exact only where those positions never attend to the rest of that pass: under
        block-causal attention, positions of blocks before the last one the pass runs.
        """
        if n < 0:
            raise LladaError(f"PrefixCache.append_next: n={n} must be >= 0")
        if not self.filled:
            raise LladaError("PrefixCache.append_next needs a filled cache: run the recording pass first")
        for slot in self.layers:
            slot.append = n

    def clear(self) -> None:
        """Forget every recorded key/value; the next forward pass records afresh."""
        self.layers, self.filled, self.last_hidden = [], False, None
