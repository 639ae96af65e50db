"""``objective=espo``: ESPO (ML-GSAI/ESPO) on the one training loop, rollouts included.

Each micro-batch holds B prompts (``data/prompts.py``'s reader). Step s is inner iteration
``k = s % mu`` of rollout round ``s // mu``; the reader gives the same prompts for the mu
steps of a round. On a round's first step the objective samples G completions per prompt
(``rollout.py``), scores them, and (mu > 1) computes the rollout policy's ELBOs under each
inner iteration's draws. Every step then scores the completions under the current policy
and the reference with iteration k's draws, and returns ESPO's loss (``diffusion/espo.py``).

Groups whose G rewards are all equal have no advantage: they are counted
(``rl/zero_std_groups``) and left out of the step's passes. When every group of a
micro-batch is such, one group still runs with weight 0, so every rank makes the same
passes (ZeRO-3's gathers) and the step has a gradient to reduce.

A round's rollouts are kept until the round ends and saved with each checkpoint
(``state_dict``), so a run pre-empted inside a round resumes on the same completions and
old ELBOs: the rollout policy's weights no longer exist after its first update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from llada_train.diffusion.espo import ESPOConfig, espo_loss, shared_elbo_draws
from llada_train.diffusion.forward import NoiseKey
from llada_train.diffusion.objective_base import LossOutput, ObjectiveConfig, full_sequence_run
from llada_train.diffusion.reference import Reference, check_reference
from llada_train.diffusion.vrpo import response_elbos
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig
from llada_train.rl.rollout import Rollouts, RolloutTask

_SAVED = ("x0", "prompt_len", "completion_index", "rewards", "accuracy", "completion_len")


def espo_config(cfg: ObjectiveConfig) -> ESPOConfig:
    """ESPO's constants from the objective group (one line for a bad value)."""
    if cfg.inner_iterations < 1:
        raise LladaError(f"objective.inner_iterations={cfg.inner_iterations}; use >= 1 (ESPO: 8)")
    if cfg.elbo_timesteps < 1:
        raise LladaError(f"objective.elbo_timesteps={cfg.elbo_timesteps}; use >= 1 (ESPO: 2)")
    try:
        return ESPOConfig(cfg.group_size, cfg.clip_eps_low, cfg.clip_eps_high, cfg.beta,
                          cfg.baseline, cfg.scale_by_std)  # fmt: skip
    except LladaError as exc:  # name the config keys the user sets
        raise LladaError(str(exc).replace("espo ", "objective.", 1)) from None


class ESPOObjective:
    """The ESPO loss of a micro-batch of prompts (see the module docstring)."""

    def __init__(
        self,
        cfg: ObjectiveConfig,
        mask_token_id: int,
        eos_token_id: int | None = None,
        task: RolloutTask | None = None,
    ) -> None:
        if task is None:
            raise LladaError("objective=espo samples rollouts: train it with llada-rl")
        self.cfg, self.espo = cfg, espo_config(cfg)
        self.mask_token_id, self.task = mask_token_id, task
        self.reference = Reference(cfg.reference, cfg.reference_path)
        self.round = -1
        self.cache: dict[tuple[int, ...], tuple[Rollouts, torch.Tensor | None]] = {}

    @classmethod
    def prepare(
        cls, cfg: ObjectiveConfig, model_cfg: ModelConfig, seq_len: int, curriculum: list[int]
    ) -> ModelConfig:
        """Start-up checks: ESPO's settings and the reference against the policy."""
        espo_config(cfg)
        if cfg.beta > 0:
            check_reference(cfg, model_cfg)
        return full_sequence_run(cfg, model_cfg, curriculum)

    # ---- scoring -----------------------------------------------------------------------
    def _elbos(
        self, model: nn.Module, ro: Rollouts, rows: torch.Tensor, round_: int, iteration: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ELBOs (R,), masked count) of ``rows`` under inner iteration ``iteration``'s draws;
        differentiable when gradients are on."""
        x0, plen = ro.x0[rows], ro.prompt_len[rows]
        draws = shared_elbo_draws(
            self.task.seed, round_, iteration, ro.completion_index[rows.cpu()], x0.shape[1],
            self.cfg.elbo_timesteps, self.cfg.eps,
        )
        return response_elbos(model, x0, plen, draws, self.mask_token_id, self.cfg.loss_chunk_rows)

    def _kept_rows(self, ro: Rollouts) -> tuple[torch.Tensor, float, int]:
        """Rows of the groups with a reward spread, the loss weight, and the skipped count."""
        g = self.espo.group_size
        grouped = ro.rewards.float().reshape(-1, g)  # (B, G)
        spread = grouped.std(dim=1) > 1e-6  # (B,)
        skipped = int((~spread).sum())
        weight = 1.0
        if not bool(spread.any()):
            spread[0], weight = True, 0.0
        groups = spread.nonzero().squeeze(1)  # (b,)
        rows = (groups[:, None] * g + torch.arange(g)[None, :]).reshape(-1)  # (b G,)
        return rows.to(ro.x0.device), weight, skipped

    def _round(self, model: nn.Module, batch: dict[str, torch.Tensor], round_: int) -> tuple[
        Rollouts, torch.Tensor | None, float
    ]:
        """This micro-batch's rollouts and old ELBOs (mu - 1, N) of the round: sampled on the
        round's first step, then reused; the rollout seconds spent now."""
        if round_ != self.round:
            self.round, self.cache = round_, {}
        key = tuple(batch["sample_index"].tolist())
        if key in self.cache:
            ro, old = self.cache[key]
            dev = batch["input_ids"].device
            if ro.x0.device != dev:  # restored from a checkpoint on the CPU
                ro = dataclasses.replace(ro, x0=ro.x0.to(dev), prompt_len=ro.prompt_len.to(dev))
                old = None if old is None else old.to(dev)
                self.cache[key] = (ro, old)
            return ro, old, 0.0
        module = getattr(model, "module", model)
        ro = self.task.rollout(module, batch, self.espo.group_size, round_)
        old = None
        if self.cfg.inner_iterations > 1:  # the rollout policy's ELBOs for later iterations
            rows = torch.arange(ro.x0.shape[0], device=ro.x0.device)
            with torch.no_grad():  # iteration 0 needs none: its old ELBO is the current one
                old = torch.stack([
                    self._elbos(model, ro, rows, round_, k)[0]
                    for k in range(1, self.cfg.inner_iterations)
                ])  # (mu - 1, N)
        self.cache[key] = (ro, old)
        return ro, old, ro.seconds

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], noise: NoiseKey
    ) -> LossOutput:
        if not isinstance(noise, NoiseKey) or "record_index" not in batch:
            raise LladaError("objective=espo needs llada-rl's prompt batches (record_index)")
        round_, iteration = divmod(noise.step, self.cfg.inner_iterations)
        ro, old_all, rollout_s = self._round(model, batch, round_)
        rows, weight, skipped = self._kept_rows(ro)
        ref = None
        if self.espo.beta > 0:
            with self.reference.scope(model, ro.x0.device) as reference:
                ref = self._elbos(reference, ro, rows, round_, iteration)[0]  # (R,)
        policy, masked = self._elbos(model, ro, rows, round_, iteration)  # (R,)
        old = None if old_all is None or iteration == 0 else old_all[iteration - 1][rows]
        cpu_rows = rows.cpu()
        out = espo_loss(policy, old, ref, ro.rewards[cpu_rows], ro.lengths[rows], self.espo)
        dev = policy.device
        grouped = ro.rewards.reshape(-1, self.espo.group_size)  # (B, G)
        metrics = {
            **{k: v for k, v in out.metrics.items() if not k.startswith("espo/reward")},
            "espo/zero_std_groups": torch.tensor(float(skipped), device=dev),
            "rl/reward_mean": grouped.mean().to(dev),
            "rl/reward_std": grouped.std(dim=1).mean().to(dev),  # within groups
            "rl/accuracy": ro.accuracy.mean().to(dev),
            "rl/response_length": ro.completion_len.float().mean().to(dev),
            "rl/rollout_s": torch.tensor(rollout_s, device=dev),
        }
        return LossOutput(out.loss * weight, int(ro.x0[rows].numel()), masked, metrics)

    # ---- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The current round's rollouts (tensors only: a weights-only checkpoint holds them)."""
        entries = []
        for key, (ro, old) in self.cache.items():
            saved = {name: getattr(ro, name).cpu() for name in _SAVED}
            entries.append({"key": list(key), **saved, "old": old.cpu() if old is not None else None})
        return {"round": self.round, "entries": entries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the round saved by :meth:`state_dict` (texts are not needed to train)."""
        self.round, self.cache = int(state["round"]), {}
        for e in state["entries"]:
            fields = {name: e[name] for name in _SAVED}
            ro = Rollouts(**fields, texts=[], seconds=0.0)
            self.cache[tuple(e["key"])] = (ro, e["old"])

