"""Learning-rate schedules: constant-with-warmup, Warmup-Stable-Decay by tokens, SFT (SPEC §4);
and the block-size curriculum of block diffusion by tokens (SPEC §8, LLaDA 2.0 §4.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llada_train.errors import LladaError


@dataclass
class BlockPhase:
    """One phase of the block-size curriculum: ``block_size`` from ``start_tokens`` on."""

    start_tokens: float = 0.0  # training tokens seen before the phase's first step
    block_size: int = 0  # 0 = the whole sequence (one block: full diffusion)


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
    # block diffusion (objective=block): the block size by tokens, phases in increasing
    # start_tokens from 0; empty = objective.block_size throughout
    block_phases: list[BlockPhase] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_block_phases(self.block_phases)


def check_block_phases(phases: list[BlockPhase]) -> None:
    """One line unless the phases start at 0 tokens and increase strictly, with sizes >= 0."""
    for i, ph in enumerate(phases):
        if ph.block_size < 0:
            raise LladaError(
                f"schedule.block_phases[{i}].block_size={ph.block_size}; use >= 1, or 0 for the "
                "whole sequence"
            )
        if i == 0 and ph.start_tokens != 0:
            raise LladaError(
                f"schedule.block_phases[0] starts at {ph.start_tokens:g} tokens; the first phase "
                "must start at 0"
            )
        if i and ph.start_tokens <= phases[i - 1].start_tokens:
            raise LladaError(
                f"schedule.block_phases[{i}] starts at {ph.start_tokens:g} tokens, not after "
                f"phase {i - 1} ({phases[i - 1].start_tokens:g}): phases must increase in tokens"
            )


def curriculum_sizes(cfg: ScheduleConfig) -> list[int]:
    """The block sizes the curriculum visits, in order (empty without one)."""
    return [ph.block_size for ph in cfg.block_phases]


def block_size_at(cfg: ScheduleConfig, tokens: float) -> int | None:
    """The curriculum's block size for the step after ``tokens`` training tokens (0 = the
    whole sequence); None without a curriculum. A function of tokens only, so a resumed run
    (which restores its token count) continues in the same phase."""
    size = None
    for ph in cfg.block_phases:
        if ph.start_tokens > tokens:
            break
        size = ph.block_size
    return size


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
