"""ESPO's loss (ML-GSAI/ESPO ``espo/espo_trainer.py``): sequence-level GRPO for masked diffusion
LMs, as a pure function of precomputed ELBOs and rewards.

The whole completion is one action; its log-likelihood is an ELBO estimate B (``vrpo.py``'s
``response_elbos``). For N = P x G completions, G per prompt, in prompt-major order:

    A_i     = r_i - mean of its group's rewards        (``baseline="group_mean"``)
    rho_i   = exp((B_theta(y_i) - B_old(y_i)) / L_i)    (L_i: the completion's length)
    policy  = -1/N sum_i min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)
    kl      = 1/N sum_i (B_theta(y_i) - B_ref(y_i))^2 / (2 L_i)   (k2, per token)
    loss    = policy + beta kl

ESPO's code divides by one L for all rows (the generation length, the completions' padded
length); pass that as every ``lengths`` entry to match it. Its code's default baseline is
leave-one-out, (sum of the other G - 1 rewards) / (G - 1), i.e. G / (G - 1) times the group-mean
advantage (``baseline="leave_one_out"``); ``scale_by_std`` divides by the group's std + 1e-4 as
its ``scale_rewards`` does. With ``old_elbo=None`` (one inner iteration) B_old is B_theta
detached, so rho = 1 with rho's gradient.

The old, reference and current ELBOs of one inner iteration must use the same (t, mask)
draws, else rho and the KL carry the estimators' noise: ``shared_elbo_draws`` gives them,
keyed by (seed, rollout step, inner iteration, completion index). Nothing here samples
rollouts or computes rewards, and no entry point runs it yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llada_train.diffusion.forward import NoiseKey
from llada_train.diffusion.vrpo import ElboDraws, elbo_draws
from llada_train.errors import LladaError

BASELINES = ("group_mean", "leave_one_out")
ESPO_STREAM = 2  # elbo_draws' stream: apart from VRPO's policy (0) and independent-reference (1)
STD_FLOOR = 1e-4  # ESPO's scale_rewards: A / (std + 1e-4)


@dataclass
class ESPOConfig:
    """ESPO's constants (its recipe: G = 6, eps = 0.2, beta = 1e-3)."""

    group_size: int = 6  # G completions per prompt
    clip_eps_low: float = 0.2  # rho is clipped to [1 - eps_low, 1 + eps_high]
    clip_eps_high: float = 0.2
    beta: float = 1e-3  # weight of the k2 KL to the reference
    baseline: str = "group_mean"  # group_mean | leave_one_out (ESPO's code)
    scale_by_std: bool = False  # divide advantages by the group's reward std + 1e-4

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise LladaError(
                f"espo group_size={self.group_size}: use >= 2 (the advantage is a reward minus "
                "its group's mean, so a group of 1 has none)"
            )
        for name in ("clip_eps_low", "clip_eps_high"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise LladaError(f"espo {name}={getattr(self, name)}; use 0 < eps < 1 (e.g. 0.2)")
        if self.beta < 0:
            raise LladaError(f"espo beta={self.beta}; use >= 0 (0 turns the KL off)")
        if self.baseline not in BASELINES:
            raise LladaError(f"espo baseline={self.baseline!r}; use one of {', '.join(BASELINES)}")


def group_advantages(rewards: torch.Tensor, cfg: ESPOConfig) -> torch.Tensor:
    """(N,) advantages of N = P x G rewards in prompt-major order (see the module's formulas)."""
    n, g = rewards.numel(), cfg.group_size
    if rewards.dim() != 1 or n == 0 or n % g:
        raise LladaError(
            f"espo: {tuple(rewards.shape)} rewards are not a whole number of groups of "
            f"group_size={g}: give P x G rewards, G per prompt, prompt-major"
        )
    grouped = rewards.float().reshape(n // g, g)  # (P, G)
    advantage = grouped - grouped.mean(dim=1, keepdim=True)  # (P, G)
    if cfg.baseline == "leave_one_out":
        advantage = advantage * (g / (g - 1))  # r - (S - r) / (G - 1) = G / (G - 1) (r - S / G)
    if cfg.scale_by_std:
        advantage = advantage / (grouped.std(dim=1, keepdim=True) + STD_FLOOR)
    return advantage.reshape(n)


@dataclass
class ESPOLoss:
    """The scalar to backpropagate and its parts for logging (0-dim tensors, no host sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _check_rows(name: str, t: torch.Tensor | None, n: int) -> None:
    if t is not None and tuple(t.shape) != (n,):
        raise LladaError(
            f"espo: {name} has shape {tuple(t.shape)}, not ({n},): one value per completion"
        )


def espo_loss(
    policy_elbo: torch.Tensor,  # (N,) B_theta, with gradients
    old_elbo: torch.Tensor | None,  # (N,) B_old of the rollout policy; None: B_theta detached
    ref_elbo: torch.Tensor | None,  # (N,) B_ref; None only with beta = 0
    rewards: torch.Tensor,  # (N,) P x G, prompt-major
    lengths: torch.Tensor,  # (N,) completion lengths L_i (> 0)
    cfg: ESPOConfig,
) -> ESPOLoss:
    """ESPO's clipped sequence-level surrogate plus beta x the k2 KL (the module's formulas)."""
    n = policy_elbo.numel()
    for name, t in (("old_elbo", old_elbo), ("ref_elbo", ref_elbo), ("rewards", rewards)):
        _check_rows(name, t, n)
    _check_rows("lengths", lengths, n)
    if not bool((lengths > 0).all()):
        raise LladaError("espo: every completion length must be > 0 (rho is per token of L)")
    if ref_elbo is None and cfg.beta > 0:
        raise LladaError(
            f"espo beta={cfg.beta} needs the reference ELBOs (ref_elbo): pass them or set beta=0"
        )
    length = lengths.to(policy_elbo.device, torch.float32)  # (N,)
    advantage = group_advantages(rewards, cfg).to(policy_elbo.device)  # (N,)
    old = policy_elbo.detach() if old_elbo is None else old_elbo.detach()
    ratio = torch.exp((policy_elbo - old) / length)  # (N,)
    clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)  # (N,)
    policy = -torch.minimum(ratio * advantage, clipped * advantage).mean()
    zero = torch.zeros((), device=policy_elbo.device)
    kl = zero
    if ref_elbo is not None:
        kl = ((policy_elbo - ref_elbo.detach()) ** 2 / (2 * length)).mean()  # k2, per token
    loss = policy + cfg.beta * kl if cfg.beta > 0 else policy
    r = ratio.detach()
    low = (r < 1 - cfg.clip_eps_low) & (advantage < 0)  # (N,) clipped where it binds
    high = (r > 1 + cfg.clip_eps_high) & (advantage > 0)  # (N,)
    grouped = rewards.float().reshape(-1, cfg.group_size)  # (P, G)
    metrics = {
        "espo/kl": kl.detach(),
        "espo/ratio_mean": r.mean(),
        "espo/clip_fraction": (low | high).float().mean(),
        "espo/clip_low_fraction": low.float().mean(),
        "espo/clip_high_fraction": high.float().mean(),
        "espo/reward_mean": grouped.mean(),
        "espo/reward_std": grouped.std(dim=1).mean(),  # within groups, as ESPO logs it
        "espo/zero_std_groups": (grouped.std(dim=1) < 1e-6).float().sum(),
    }
    return ESPOLoss(loss, metrics)


def shared_elbo_draws(
    seed: int,
    rollout_step: int,
    iteration: int,
    completion_index: torch.Tensor,  # (N,) global index of each completion
    length: int,
    samples: int,
    eps: float = 1e-3,
) -> ElboDraws:
    """The (t, mask) draws that the old, reference and current ELBOs of inner iteration
    ``iteration`` share: ``samples`` timesteps, one mask each, keyed by (seed, rollout step,
    iteration, completion index), so a resumed run redraws them."""
    iterations = torch.full_like(completion_index, iteration)  # (N,)
    noise = NoiseKey(seed, rollout_step)
    return elbo_draws(noise, completion_index, iterations, length, samples, 1, eps, ESPO_STREAM)
