"""Pre-training (SPEC §2) and SFT (SPEC §3) objectives: ``objective(model, batch, generator)``.

Both run the model to its final hidden states, gather the masked positions, and run
``ln_f``, the head and the cross entropy on those rows only, in chunks
(``diffusion/chunked_ce.py``). Per masked position the loss is ``weight(row) * CE``:
pre-training ``1 / (p * B * L)``, SFT ``1 / (p * ans_len * B)``.
"""

from __future__ import annotations

import torch
from torch import nn

from llada_train.diffusion.chunked_ce import chunked_head_ce, masked_rows
from llada_train.diffusion.forward import (
    NoiseKey,
    mask_from_uniforms,
    mask_tokens,
    maybe_cut_length,
    sample_mask_prob,
)
from llada_train.diffusion.objective_base import LossOutput, ObjectiveConfig

__all__ = ["LossOutput", "ObjectiveConfig", "PretrainObjective", "SFTObjective", "masked_head_loss"]


def masked_head_loss(
    model: nn.Module,
    noisy: torch.Tensor,  # (B, L) model input
    x0: torch.Tensor,  # (B, L) targets
    masked: torch.Tensor,  # (B, L) bool: positions that carry loss
    row_weight: torch.Tensor,  # (B,) weight of each masked position of the row, or (B, L)
    chunk_rows: int,
    max_rows: int | None = None,
    document_ids: torch.Tensor | None = None,  # (B, L) int64: attention within documents
    block_size: int | None = None,  # passed to the model when given (0 = no blocks)
    paired: bool = False,  # ``noisy`` is cat(x_t, x_0) (B, 2L): a block-diffusion pass
) -> torch.Tensor:
    """sum over masked positions of ``row_weight * CE``, with the head on masked rows only.

    ``model`` may be a DeepSpeed engine: it forwards the call to its module, while the head
    modules live on ``engine.module``. They are called as modules so ZeRO-3 can gather them;
    ``max_rows`` (>= the masked count) then fixes the number of head calls per step.
    ``row_weight`` may also be (B, L): one weight per position. With ``paired`` the model
    returns the x_t half's rows only, so ``x0`` and ``masked`` are (B, L) as usual.
    """
    t = getattr(model, "module", model).transformer
    kwargs: dict = {} if document_ids is None else {"document_ids": document_ids}
    if block_size is not None:
        kwargs["block_size"] = block_size
    if paired:
        kwargs["paired"] = True
    hidden = model(noisy, return_hidden=True, **kwargs)  # (B, L, d), before ln_f
    rows, tgt, w = masked_rows(hidden, x0, masked, row_weight)  # (R, d), (R,), (R,)

    def head(h: torch.Tensor) -> torch.Tensor:
        return t.ff_out(t.ln_f(h))  # (n, V)

    return chunked_head_ce(rows, head, tgt, w, chunk_rows, head_module=t.ff_out, max_rows=max_rows)


class PretrainObjective:
    """Sum over masked positions of CE / p, divided by B * L (SPEC §2)."""

    def __init__(self, cfg: ObjectiveConfig, mask_token_id: int, eos_token_id: int | None = None) -> None:
        self.cfg = cfg
        self.mask_token_id = mask_token_id  # eos_token_id: unused (the registry's signature)

    def draw(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | NoiseKey
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The noised batch: (x0, noisy, masked, row weight 1 / (p B L)).

        A ``NoiseKey`` draws from (seed, step, ``batch["sample_index"]``); a generator draws
        from its stream (the draws of checkpoints written before the keys existed).
        """
        if isinstance(generator, NoiseKey):
            ids, index = batch["input_ids"], batch["sample_index"]
            x0 = ids[:, : generator.cut_length(ids.shape[1], self.cfg.var_len_prob)]  # (B, L')
            B, L = x0.shape
            p = generator.mask_prob(index, self.cfg.eps).to(x0.device)  # (B,)
            u = generator.token_uniforms(index, L)  # (B, L')
            noisy, masked = mask_from_uniforms(x0, p, u, self.mask_token_id)
            return x0, noisy, masked, 1.0 / (p * (B * L))
        x0 = maybe_cut_length(batch["input_ids"], self.cfg.var_len_prob, generator)  # (B, L)
        B, L = x0.shape
        p = sample_mask_prob(B, self.cfg.eps, generator).to(x0.device)  # (B,)
        noisy, masked = mask_tokens(x0, p, self.mask_token_id, generator)
        return x0, noisy, masked, 1.0 / (p * (B * L))

    def __call__(
        self, model, batch: dict[str, torch.Tensor], generator: torch.Generator | NoiseKey
    ) -> LossOutput:
        x0, noisy, masked, w = self.draw(batch, generator)
        # the uncut width bounds the rows: the same head-call count every step under ZeRO-3
        max_rows = batch["input_ids"].numel()
        docs = batch.get("document_ids")
        docs = None if docs is None else docs[:, : x0.shape[1]]  # cut like the tokens
        loss = masked_head_loss(
            model, noisy, x0, masked, w, self.cfg.loss_chunk_rows, max_rows, docs
        )
        return LossOutput(loss, x0.numel(), masked.sum())


class SFTObjective:
    """Prompt never masked; masked response CE / p / ans_len per row, then / B (SPEC §3).

    The EOS padding after a short response is part of the response: it may be masked and
    counts in ``ans_len``, which is how the model learns to stop.
    """

    def __init__(self, cfg: ObjectiveConfig, mask_token_id: int, eos_token_id: int | None = None) -> None:
        self.cfg = cfg
        self.mask_token_id = mask_token_id  # eos_token_id: unused (the registry's signature)

    def draw(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | NoiseKey
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, noisy, masked, row weight 1 / (p ans_len B)); prompts optionally dropped to MASK.

        A ``NoiseKey`` draws per sample from ``batch["sample_index"]``, as in pre-training.
        """
        x0 = batch["input_ids"]  # (B, L)
        prompt_len = batch["prompt_len"].to(x0.device)  # (B,)
        B, L = x0.shape
        positions = torch.arange(L, device=x0.device)[None, :]
        is_prompt = positions < prompt_len[:, None]  # (B, L)
        keyed = isinstance(generator, NoiseKey)
        if keyed:
            index = batch["sample_index"]
            p = generator.mask_prob(index, self.cfg.eps).to(x0.device)
            u = generator.token_uniforms(index, L)
            noisy, masked = mask_from_uniforms(x0, p, u, self.mask_token_id, maskable=~is_prompt)
        else:
            p = sample_mask_prob(B, self.cfg.eps, generator).to(x0.device)
            noisy, masked = mask_tokens(x0, p, self.mask_token_id, generator, maskable=~is_prompt)
        if self.cfg.p_uncond > 0:
            if keyed:
                u = generator.drop_uniforms(batch["sample_index"]).to(x0.device)
            else:
                u = torch.rand(B, generator=generator, device=generator.device).to(x0.device)
            drop = u < self.cfg.p_uncond  # (B,)
            noisy = torch.where(is_prompt & drop[:, None], torch.full_like(noisy, self.mask_token_id), noisy)
        ans_len = (L - prompt_len).clamp(min=1).to(torch.float32)  # (B,) EOS padding included
        return x0, noisy, masked, 1.0 / (p * ans_len * B)

    def __call__(
        self, model, batch: dict[str, torch.Tensor], generator: torch.Generator | NoiseKey
    ) -> LossOutput:
        x0, noisy, masked, w = self.draw(batch, generator)
        loss = masked_head_loss(model, noisy, x0, masked, w, self.cfg.loss_chunk_rows, x0.numel())
        return LossOutput(loss, x0.numel(), masked.sum())
