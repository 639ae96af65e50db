"""Pre-training (SPEC §2) and SFT (SPEC §3) objectives: ``objective(model, batch, generator)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llada_train.diffusion.forward import mask_tokens, maybe_cut_length, sample_mask_prob
from llada_train.errors import LladaError


@dataclass
class ObjectiveConfig:
    """Which objective and its constants (paper values by default)."""

    name: str = "pretrain"  # "pretrain" or "sft"
    eps: float = 1e-3  # p = (1 - eps) t + eps
    var_len_prob: float = 0.01  # pretrain: chance the whole batch is cut to U{1..L}
    p_uncond: float = 0.0  # sft: chance a row's prompt is replaced by MASK (CFG training)


@dataclass
class LossOutput:
    """The scalar to backpropagate plus counts for logging."""

    loss: torch.Tensor
    num_tokens: int  # tokens the model saw (B * L after any cut)
    num_masked: int


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy in fp32, zero where not masked; (B, L)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, L)
    return ce * masked


def pretrain_loss_from(ce_masked: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """SPEC §2: sum over masked positions of CE / p, divided by B * L."""
    B, L = ce_masked.shape
    return (ce_masked / p_mask[:, None]).sum() / (B * L)


def sft_loss_from(ce_masked: torch.Tensor, p_mask: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """SPEC §3: sum over masked response positions of CE / p / ans_len(row), divided by B."""
    B, L = ce_masked.shape
    ans_len = (L - prompt_len).clamp(min=1).to(torch.float32)  # (B,) EOS padding included
    return (ce_masked / p_mask[:, None] / ans_len[:, None]).sum() / B


class PretrainObjective:
    """Sum over masked positions of CE / p, divided by B * L (SPEC §2)."""

    def __init__(self, cfg: ObjectiveConfig, mask_token_id: int) -> None:
        self.cfg = cfg
        self.mask_token_id = mask_token_id

    def __call__(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossOutput:
        x0 = maybe_cut_length(batch["input_ids"], self.cfg.var_len_prob, generator)  # (B, L)
        B, L = x0.shape
        p = sample_mask_prob(B, self.cfg.eps, generator).to(x0.device)  # (B,)
        noisy, masked = mask_tokens(x0, p, self.mask_token_id, generator)
        logits = model(noisy)  # (B, L, V)
        loss = pretrain_loss_from(masked_ce(logits, x0, masked), p)
        return LossOutput(loss, B * L, int(masked.sum()))


class SFTObjective:
    """Prompt never masked; masked response CE / p / ans_len per row, then / B (SPEC §3).

    The EOS padding after a short response is part of the response: it may be masked and
    counts in ``ans_len``, which is how the model learns to stop.
    """

    def __init__(self, cfg: ObjectiveConfig, mask_token_id: int) -> None:
        self.cfg = cfg
        self.mask_token_id = mask_token_id

    def __call__(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossOutput:
        x0 = batch["input_ids"]  # (B, L)
        prompt_len = batch["prompt_len"].to(x0.device)  # (B,)
        B, L = x0.shape
        positions = torch.arange(L, device=x0.device)[None, :]
        is_prompt = positions < prompt_len[:, None]  # (B, L)
        p = sample_mask_prob(B, self.cfg.eps, generator).to(x0.device)
        noisy, masked = mask_tokens(x0, p, self.mask_token_id, generator, maskable=~is_prompt)
        if self.cfg.p_uncond > 0:
            drop = torch.rand(B, generator=generator, device=generator.device).to(x0.device) < self.cfg.p_uncond
            noisy = torch.where(is_prompt & drop[:, None], torch.full_like(noisy, self.mask_token_id), noisy)
        logits = model(noisy)  # (B, L, V)
        loss = sft_loss_from(masked_ce(logits, x0, masked), p, prompt_len)
        return LossOutput(loss, B * L, int(masked.sum()))


def build_objective(cfg: ObjectiveConfig, mask_token_id: int) -> PretrainObjective | SFTObjective:
    """The objective named by ``cfg.name``."""
    objectives = {"pretrain": PretrainObjective, "sft": SFTObjective}
    if cfg.name not in objectives:
        raise LladaError(f"objective.name={cfg.name!r} is unknown; use one of {sorted(objectives)}")
    return objectives[cfg.name](cfg, mask_token_id)
