"""Learning-rate schedules: constant-with-warmup, Warmup-Stable-Decay by tokens, SFT (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass

from llada_train.errors import LladaError


@dataclass
class ScheduleConfig:
    """One schema for every schedule; ``name`` picks the formula.

    WSD phase boundaries are in tokens so they survive batch-size changes; warmup is in
    iterations, as in the paper.
    """

    name: str = "constant"  # "constant", "wsd" or "sft"
    peak_lr: float = 4e-4
    warmup_steps: int = 2000
    # wsd: constant peak_lr until drop_at_tokens, then drop_lr; linear to final_lr over the
    # last decay_tokens of total_tokens
    drop_at_tokens: float = 1.2e12
    drop_lr: float = 1e-4
    decay_tokens: float = 0.3e12
    total_tokens: float = 2.3e12
    final_lr: float = 1e-5
    # sft: linear decay to final_lr over the last decay_fraction of max_steps
    decay_fraction: float = 0.1


def wsd_lr(cfg: ScheduleConfig, step: int, tokens: float) -> float:
    """Warmup-Stable-Decay: ``step`` is the iteration about to run, ``tokens`` those seen before it."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    decay_start = cfg.total_tokens - cfg.decay_tokens
    if tokens < cfg.drop_at_tokens and tokens < decay_start:
        return cfg.peak_lr
    if tokens < decay_start:
        return cfg.drop_lr
    frac = min(1.0, (tokens - decay_start) / cfg.decay_tokens)
    start = cfg.drop_lr if cfg.drop_at_tokens <= decay_start else cfg.peak_lr
    return start + (cfg.final_lr - start) * frac


def sft_lr(cfg: ScheduleConfig, step: int, max_steps: int) -> float:
    """Linear warmup, constant, then linear to ``final_lr`` over the last ``decay_fraction``."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return cfg.peak_lr
    frac = min(1.0, (step - decay_start + 1) / decay_steps)
    return cfg.peak_lr + (cfg.final_lr - cfg.peak_lr) * frac


def lr_at(cfg: ScheduleConfig, step: int, tokens: float, max_steps: int) -> float:
    """The learning rate for iteration ``step`` (0-based) after ``tokens`` training tokens."""
    if cfg.name == "constant":
        if step < cfg.warmup_steps:
            return cfg.peak_lr * (step + 1) / cfg.warmup_steps
        return cfg.peak_lr
    if cfg.name == "wsd":
        return wsd_lr(cfg, step, tokens)
    if cfg.name == "sft":
        return sft_lr(cfg, step, max_steps)
    raise LladaError(f"schedule.name={cfg.name!r} is unknown; use 'constant', 'wsd' or 'sft'")
