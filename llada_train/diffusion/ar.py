"""The autoregressive twin's objective: next-token cross entropy, mean over predicted tokens.

It shares everything with the diffusion objectives except the targets: the model runs to its
final hidden states, the rows that predict a token are gathered, and ``ln_f``, the head and
the cross entropy run on them in chunks (``chunked_head_ce``), so the twins differ only in
the attention mask (``model.causal``) and in what each position is asked to predict.
"""

from __future__ import annotations

from typing import Any

import torch

from llada_train.diffusion.chunked_ce import chunked_head_ce, masked_rows
from llada_train.diffusion.objective_base import LossOutput, ObjectiveConfig, full_sequence_run
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig


def ar_targets(
    x: torch.Tensor,  # (B, L) tokens
    shift_logits: bool,
    prompt_len: torch.Tensor | None = None,  # (B,) SFT rows: tokens before it are not predicted
    attention_mask: torch.Tensor | None = None,  # (B, L) 1 = real; pads neither predict nor are
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (B, L), predicted (B, L) bool) aligned with the model's output rows.

    Unshifted output row i predicts token i+1 (the last row predicts nothing); a
    ``shift_logits`` model already moved that prediction to row i+1, so row i predicts
    token i and row 0 nothing. Either way token j is predicted from tokens < j.
    """
    B, L = x.shape
    pos = torch.arange(L, device=x.device)[None, :].expand(B, L)  # (B, L)
    if shift_logits:
        targets, target_pos = x, pos
    else:
        targets = torch.cat([x[:, 1:], x[:, :1]], dim=1)  # last column: a dummy, never used
        target_pos = pos + 1
    predicted = (target_pos >= 1) & (target_pos < L)  # token 0 has no context to come from
    if prompt_len is not None:
        predicted &= target_pos >= prompt_len.to(x.device)[:, None]
    if attention_mask is not None:
        real = torch.cat([attention_mask.bool(), attention_mask.new_zeros(B, 1).bool()], dim=1)
        # both the token and the position predicting it (the one before) must be real:
        # a left-padded row's first real token has no context, like token 0
        predicted &= real.gather(1, target_pos.clamp(max=L))
        predicted &= real.gather(1, (target_pos - 1).clamp(min=0))
    return targets, predicted


def require_causal(model_cfg: Any) -> None:
    """``objective=ar`` trains only a causal model (checked at start-up and at each call)."""
    if not model_cfg.causal:
        raise LladaError(
            "objective=ar needs a causal model: set model.causal=true "
            "(a bidirectional model sees the token it predicts)"
        )


class ARObjective:
    """Next-token CE averaged over the predicted tokens of the (micro-)batch.

    Pre-training data: every token after the first of each row. SFT data (a ``prompt_len``
    in the batch): the response tokens only, EOS padding included as in SPEC §3. Refuses a
    bidirectional model, which could read the token it is asked to predict.
    """

    def __init__(
        self, cfg: ObjectiveConfig, mask_token_id: int | None = None, eos_token_id: int | None = None
    ) -> None:
        self.cfg = cfg  # the token ids are unused: the AR objective masks and pads nothing

    @classmethod
    def prepare(
        cls, cfg: ObjectiveConfig, model_cfg: ModelConfig, seq_len: int, curriculum: list[int]
    ) -> ModelConfig:
        """Start-up: a causal model, and no block curriculum (the registry's hook)."""
        require_causal(model_cfg)
        return full_sequence_run(cfg, model_cfg, curriculum)

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], generator: Any = None) -> LossOutput:
        inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
        cfg = inner.config
        require_causal(cfg)
        x = batch["input_ids"]  # (B, L)
        B, L = x.shape
        targets, predicted = ar_targets(
            x, cfg.shift_logits, batch.get("prompt_len"), batch.get("attention_mask")
        )
        kwargs = {}
        if batch.get("document_ids") is not None:
            kwargs["document_ids"] = batch["document_ids"]
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        hidden = model(x, return_hidden=True, **kwargs)  # (B, L, d), before ln_f
        count = predicted.sum()  # 0-dim int64; stays on the device
        weight = (1.0 / count.clamp(min=1).to(torch.float32)).expand(B)  # (B,) mean weight
        rows, tgt, w = masked_rows(hidden, targets, predicted, weight)
        t = inner.transformer

        def head(h: torch.Tensor) -> torch.Tensor:
            return t.ff_out(t.ln_f(h))  # (n, V)

        loss = chunked_head_ce(
            rows, head, tgt, w, self.cfg.loss_chunk_rows, head_module=t.ff_out, max_rows=B * L
        )
        return LossOutput(loss, x.numel(), count)
