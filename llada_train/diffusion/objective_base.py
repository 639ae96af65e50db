"""What every objective shares: its config schema and its output. Imports no objective.

``ObjectiveConfig`` is the Hydra schema of the ``objective`` group, so it must name every key
of every ``conf/objective/*.yaml`` (the group is strict). ``LossOutput`` is what an
objective returns to the loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

T_PER = ("block", "sequence")
WEIGHTS = ("inverse_p", "uniform")


@dataclass
class ObjectiveConfig:
    """Which objective and its constants (paper values by default)."""

    name: str = "pretrain"  # a key of diffusion/registry.py's table: pretrain, sft, ar, block, ...
    eps: float = 1e-3  # p = (1 - eps) t + eps
    var_len_prob: float = 0.01  # pretrain: chance the whole batch is cut to U{1..L}
    p_uncond: float = 0.0  # sft: chance a row's prompt is replaced by MASK (CFG training)
    # masked rows per cross-entropy chunk; each chunk's (rows, vocab) logits are recomputed
    # in backward instead of kept. 0 = one chunk, no recompute (fastest, most memory).
    loss_chunk_rows: int = 1024
    # ---- objective=block (BD3-LM / LLaDA 2.0 block diffusion; diffusion/block.py) ---------
    block_size: int = 0  # tokens per block; 0 or >= the length = one block (full diffusion)
    t_per: str = "block"  # "block": one t per block (BD3-LM); "sequence": one t per row
    antithetic: bool = True  # per-block t: one draw per stratum of [0, 1) across a row's blocks
    weight: str = "inverse_p"  # "inverse_p": CE / p (the NELBO); "uniform": CE
    mask_ratio_min: float = 0.0  # t is mapped into [min, max] (dFactory: 0.3 - 0.8)
    mask_ratio_max: float = 1.0
    complementary: bool = False  # a second view with the inverted mask (Fast-dLLM v2)
    # LLaDA 2.0 §7.1: Gaussian noise (this std) on the MASK token's embedding output for the
    # first mask_embed_noise_steps steps (an AR model's unused MASK embedding has decayed)
    mask_embed_noise_std: float = 0.0
    mask_embed_noise_steps: int = 0
    # ---- objective=vrpo (LLaDA 1.5 DPO on ELBO estimates; diffusion/vrpo.py) and espo --------
    beta: float = 0.1  # vrpo: DPO's weight on the log-ratio margins; espo: the k2 KL's weight
    elbo_timesteps: int = 8  # n_t: timesteps per ELBO estimate ...
    elbo_masks_per_timestep: int = 1  # ... n_yt masks each (budget n = n_t * n_yt; VRPO: n, 1)
    shared_reference_noise: bool = True  # vrpo: policy and reference see the same (t, mask) draws
    reference: str = "frozen_copy"  # frozen_copy (of reference_path) | lora_base (adapters off)
    reference_path: str | None = None  # frozen_copy's weights (conf/objective/*.yaml: init_from)
    # ---- objective=espo (sequence-level GRPO with rollouts; rl/objective.py, llada-rl) -----
    group_size: int = 6  # G completions per prompt
    inner_iterations: int = 1  # mu: optimizer steps on each round of rollouts
    clip_eps_low: float = 0.2  # the ratio is clipped to [1 - low, 1 + high]
    clip_eps_high: float = 0.2
    baseline: str = "group_mean"  # group_mean | leave_one_out (ESPO's code)
    scale_by_std: bool = False  # advantages / (group reward std + 1e-4)

    def __post_init__(self) -> None:
        if self.loss_chunk_rows < 0:
            raise LladaError(f"objective.loss_chunk_rows={self.loss_chunk_rows}; use >= 0 (0 = no chunking)")
        if self.block_size < 0:
            raise LladaError(f"objective.block_size={self.block_size}; use >= 1, or 0 for one block")
        if self.t_per not in T_PER:
            raise LladaError(f"objective.t_per={self.t_per!r}; use one of {', '.join(T_PER)}")
        if self.weight not in WEIGHTS:
            raise LladaError(f"objective.weight={self.weight!r}; use one of {', '.join(WEIGHTS)}")
        if not 0.0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise LladaError(
                f"objective.mask_ratio_min={self.mask_ratio_min}, mask_ratio_max="
                f"{self.mask_ratio_max}: need 0 <= min <= max <= 1"
            )
        if self.mask_embed_noise_std < 0 or self.mask_embed_noise_steps < 0:
            raise LladaError("objective.mask_embed_noise_std and mask_embed_noise_steps must be >= 0")


@dataclass
class LossOutput:
    """The scalar to backpropagate plus counts for logging."""

    loss: torch.Tensor
    num_tokens: int  # tokens the model saw (B * L after any cut), known on the host
    num_masked: torch.Tensor  # 0-dim int64 on the batch's device: read it only when logging
    # an objective's own per-step metrics (e.g. ``vrpo/reward_accuracy``): 0-dim tensors on the
    # batch's device, this micro-batch's values. The loop logs each one's mean over the step's
    # micro-batches and ranks, so every micro-batch on every rank must report the same keys.
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def full_sequence_run(cfg: ObjectiveConfig, model_cfg: ModelConfig, curriculum: list[int]) -> ModelConfig:
    """The start-up rule of objectives that train full-sequence passes (no blocks).

    They take no block-size curriculum, and a block model's ``block_size`` is reset to 0 for
    them: their plain passes would otherwise be block-causal, and the export would claim
    blocks it was not trained with.
    """
    if curriculum:
        raise LladaError(
            f"schedule.block_phases sets a block-size curriculum, but objective={cfg.name} "
            "trains no blocks: use objective=block, or schedule.block_phases=[]"
        )
    return dataclasses.replace(model_cfg, block_size=0) if model_cfg.block_size else model_cfg
