"""VRPO (LLaDA 1.5, arXiv 2505.19223): DPO whose log-likelihoods are ELBO estimates.

    loss = -log sigma(beta [(B_theta(y_w) - B_ref(y_w)) - (B_theta(y_l) - B_ref(y_l))])

    B(y) = 1/n sum_{k < n_t} sum_{j < n_yt} 1/p_k sum_{i masked} log pi(y_i | y_t, x)

with p_k = (1 - eps) t_k + eps, t_k ~ U(0, 1), and each of the n_yt masks of timestep k a
per-token Bernoulli(p_k) draw over the response (the prompt is never masked; the EOS padding
of the batch is response, as in SFT). The paper's three variance reductions are:

1. a budget of n = n_t * n_yt samples per ELBO (``objective.elbo_timesteps`` *
   ``objective.elbo_masks_per_timestep``, default 8 * 1);
2. its optimal allocation: n timesteps with one mask each (the default);
3. the same (t, mask) draws for the policy and the reference on each response
   (``objective.shared_reference_noise``). The paper calls it antithetic sampling; it is named
   apart from ``objective.antithetic``, block diffusion's stratified per-block t.

Every draw is a hash of (seed, step, global pair index, response, sample), so any topology
draws the same masks and a resumed run redraws them exactly.

Reference (``objective.reference``, ``reference.py``): ``frozen_copy`` or ``lora_base``.

Batches (``llada_train/data/preference.py``): ``input_ids`` (2B, L) with rows [0, B) prompt +
chosen and rows [B, 2B) prompt + rejected, ``prompt_len`` (2B,), ``sample_index`` (B,).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llada_train.diffusion.chunked_ce import agree_num_chunks
from llada_train.diffusion.forward import NoiseKey, mask_from_uniforms
from llada_train.diffusion.objective_base import LossOutput, ObjectiveConfig, full_sequence_run
from llada_train.diffusion.reference import Reference, check_reference
from llada_train.errors import LladaError
from llada_train.keyed_random import derive_key, uniform01
from llada_train.model.config import ModelConfig

_VRPO = 0x5652  # keeps VRPO's draws apart from the other objectives' streams
POLICY_STREAM, INDEPENDENT_REFERENCE_STREAM = 0, 1
CHOSEN, REJECTED = 0, 1

Head = Callable[[torch.Tensor], torch.Tensor]  # (n, d) hidden rows -> (n, V) logits


def check_vrpo_config(cfg: ObjectiveConfig) -> None:
    """One line for a VRPO setting out of range."""
    if not cfg.beta > 0:
        raise LladaError(f"objective.beta={cfg.beta}; use > 0 (DPO's KL weight, e.g. 0.1)")
    if cfg.elbo_timesteps < 1 or cfg.elbo_masks_per_timestep < 1:
        raise LladaError(
            f"objective.elbo_timesteps={cfg.elbo_timesteps}, elbo_masks_per_timestep="
            f"{cfg.elbo_masks_per_timestep}: both must be >= 1 (VRPO: n timesteps, 1 mask each)"
        )


@dataclass
class ElboDraws:
    """The randomness of the ELBO estimates of R responses, n = n_t * n_yt samples each."""

    p: torch.Tensor  # (R, n) masking probability; samples k * n_yt .. k * n_yt + n_yt - 1 share t_k
    u: torch.Tensor  # (R, n, L) per-token uniforms: masked where u < p

    @property
    def samples(self) -> int:
        return self.p.shape[1]


def elbo_draws(
    noise: NoiseKey,
    index: torch.Tensor,  # (R,) global pair index of each response
    response: torch.Tensor,  # (R,) CHOSEN or REJECTED
    length: int,
    n_timesteps: int,
    masks_per_timestep: int,
    eps: float,
    stream: int = POLICY_STREAM,
) -> ElboDraws:
    """Keyed draws of (seed, step, pair, response, stream): a longer ``length`` extends the
    same per-token draws, so a response's masks do not depend on the batch's padding."""
    n = n_timesteps * masks_per_timestep
    keys = [
        derive_key(noise.seed, noise.step, i, _VRPO, r, stream)
        for i, r in zip(index.tolist(), response.tolist(), strict=True)
    ]
    t_keys = np.array([derive_key(k, 0) for k in keys], dtype=np.uint64)  # (R,)
    u_keys = np.array([derive_key(k, 1) for k in keys], dtype=np.uint64)  # (R,)
    # uniform01(c ^ key, 0) == uniform01(c, key): one vectorised hash for all R responses
    t = uniform01(np.arange(n_timesteps, dtype=np.uint64)[None, :] ^ t_keys[:, None], 0)
    p_rows = np.repeat((1 - eps) * t + eps, masks_per_timestep, axis=1)  # (R, n)
    # counter of (sample s, position j) = s << 32 | j: distinct per token, and a longer
    # length only appends counters
    counters = (np.arange(n, dtype=np.uint64)[:, None] << np.uint64(32)) | np.arange(
        length, dtype=np.uint64
    )[None, :]  # (n, L)
    u_rows = uniform01(counters[None, :, :] ^ u_keys[:, None, None], 0)  # (R, n, L)
    p = torch.from_numpy(p_rows).float()  # (R, n)
    u = torch.from_numpy(u_rows).float()  # (R, n, L)
    return ElboDraws(p, u)


def _chunk_log_probs(head: Head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(rows).float(), targets, reduction="none")  # (n,)


def chunked_log_probs(
    rows: torch.Tensor,  # (M, d) hidden rows before ln_f
    head: Head,
    targets: torch.Tensor,  # (M,)
    chunk_rows: int,
    head_module: nn.Module,
    max_rows: int,
) -> torch.Tensor:
    """fp32 log pi(target) per row, (M,), the head run on ``chunk_rows`` rows at a time.

    With gradients each chunk is recomputed in backward (only one chunk's logits alive);
    under ZeRO-3 every rank runs the same number of head calls (see ``chunked_ce``).
    """
    M = rows.shape[0]
    if chunk_rows <= 0:
        return _chunk_log_probs(head, rows, targets)
    n = max(1, math.ceil(M / chunk_rows))
    if any(hasattr(p, "ds_id") for p in head_module.parameters()):
        n = agree_num_chunks(max(n, math.ceil(max_rows / chunk_rows)), rows.device)
    size = math.ceil(M / n)
    out = []
    for i in range(n):
        sl = slice(i * size, (i + 1) * size)  # empty past M on ranks with fewer rows
        if torch.is_grad_enabled():
            out.append(
                checkpoint(
                    _chunk_log_probs,
                    head,
                    rows[sl],
                    targets[sl],
                    use_reentrant=False,
                    preserve_rng_state=False,
                )
            )
        else:
            out.append(_chunk_log_probs(head, rows[sl], targets[sl]))
    return torch.cat(out)


def response_elbos(
    model: nn.Module,
    x0: torch.Tensor,  # (R, L) prompt + response (+ EOS padding)
    prompt_len: torch.Tensor,  # (R,)
    draws: ElboDraws,
    mask_token_id: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ELBO estimate per response (R,) fp32, masked positions (0-dim)) in one forward of
    R * n rows; differentiable when gradients are enabled. ``model`` may be a DeepSpeed engine."""
    R, L = x0.shape
    n, dev = draws.samples, x0.device
    ids = x0.repeat_interleave(n, dim=0)  # (R n, L)
    p = draws.p.reshape(R * n).to(dev)  # (R n,)
    u = draws.u[:, :, :L].reshape(R * n, L)  # (R n, L)
    maskable = (
        torch.arange(L, device=dev)[None, :] >= prompt_len.to(dev).repeat_interleave(n)[:, None]
    )
    noisy, masked = mask_from_uniforms(ids, p, u, mask_token_id, maskable)
    t = getattr(model, "module", model).transformer
    hidden = model(noisy, return_hidden=True)  # (R n, L, d)
    idx = masked.reshape(-1).nonzero().squeeze(1)  # (M,) the one host sync
    rows = hidden.reshape(R * n * L, -1).index_select(0, idx)  # (M, d)
    targets = ids.reshape(-1).index_select(0, idx)  # (M,)
    sample = idx // L  # (M,) which of the R n rows
    weight = (1.0 / (p * n)).index_select(0, sample)  # (M,) the 1/p factor and the mean over n

    def head(h: torch.Tensor) -> torch.Tensor:
        return t.ff_out(t.ln_f(h))  # (m, V)

    logp = chunked_log_probs(rows, head, targets, chunk_rows, t.ff_out, R * n * L)  # (M,)
    elbo = torch.zeros(R, dtype=torch.float32, device=dev).index_add(0, sample // n, weight * logp)
    return elbo, masked.sum()


@dataclass
class PreferenceScores:
    """What one micro-batch's B pairs give: the DPO score and the four ELBO estimates."""

    score: torch.Tensor  # (B,) beta * [(pol_w - ref_w) - (pol_l - ref_l)]
    policy: torch.Tensor  # (2B,) chosen rows then rejected rows
    reference: torch.Tensor  # (2B,)
    num_masked: torch.Tensor  # 0-dim, the policy pass's masked positions


class VRPOObjective:
    """``objective=vrpo``: the DPO loss on ELBO estimates, mean over the micro-batch's pairs."""

    def __init__(
        self, cfg: ObjectiveConfig, mask_token_id: int, eos_token_id: int | None = None
    ) -> None:
        check_vrpo_config(cfg)
        self.cfg = cfg
        self.mask_token_id = mask_token_id  # eos_token_id: unused (the registry's signature)
        self.reference = Reference(cfg.reference, cfg.reference_path)

    @classmethod
    def prepare(
        cls, cfg: ObjectiveConfig, model_cfg: ModelConfig, seq_len: int, curriculum: list[int]
    ) -> ModelConfig:
        """Start-up checks: settings, and a frozen copy's config.json against the policy's."""
        check_vrpo_config(cfg)
        check_reference(cfg, model_cfg)
        return full_sequence_run(cfg, model_cfg, curriculum)

    def _reference_elbos(
        self, model: nn.Module, x0: torch.Tensor, prompt_len: torch.Tensor, draws: ElboDraws
    ) -> torch.Tensor:
        with self.reference.scope(model, x0.device) as reference:
            chunk = self.cfg.loss_chunk_rows
            return response_elbos(reference, x0, prompt_len, draws, self.mask_token_id, chunk)[0]

    def scores(
        self, model: nn.Module, batch: dict[str, torch.Tensor], noise: NoiseKey
    ) -> PreferenceScores:
        """The DPO scores of the batch's pairs; the reference pass runs first, without gradients."""
        if not isinstance(noise, NoiseKey):
            raise LladaError(
                "objective=vrpo needs preference batches with sample_index "
                "(llada-dpo's reader): the masks are keyed by pair"
            )
        x0, prompt_len, index = batch["input_ids"], batch["prompt_len"], batch["sample_index"]
        B = index.shape[0]
        if x0.shape[0] != 2 * B:
            raise LladaError(
                f"objective=vrpo: a batch of {B} pairs has {x0.shape[0]} rows, not "
                f"{2 * B} (chosen rows then rejected rows): use llada-dpo's reader"
            )
        pairs = index.cpu().repeat(2)  # (2B,)
        response = torch.tensor([CHOSEN] * B + [REJECTED] * B)  # (2B,)
        c = self.cfg
        args = (x0.shape[1], c.elbo_timesteps, c.elbo_masks_per_timestep, c.eps)
        draws = elbo_draws(noise, pairs, response, *args, POLICY_STREAM)
        ref_draws = (
            draws
            if c.shared_reference_noise
            else elbo_draws(noise, pairs, response, *args, INDEPENDENT_REFERENCE_STREAM)
        )
        reference = self._reference_elbos(model, x0, prompt_len, ref_draws)  # (2B,)
        policy, masked = response_elbos(
            model, x0, prompt_len, draws, self.mask_token_id, c.loss_chunk_rows
        )  # (2B,)
        margin = policy - reference  # (2B,)
        score = c.beta * (margin[:B] - margin[B:])  # (B,)
        return PreferenceScores(score, policy, reference, masked)

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], noise: NoiseKey
    ) -> LossOutput:
        out = self.scores(model, batch, noise)
        loss = F.softplus(-out.score).mean()  # -log sigma(score), mean over pairs
        return LossOutput(loss, batch["input_ids"].numel(), out.num_masked, preference_metrics(out))


def preference_metrics(out: PreferenceScores) -> dict[str, torch.Tensor]:
    """The DPO reward statistics of a micro-batch's pairs (means over pairs, no host sync).

    ``reward_margin`` is the score beta [(pol_w - ref_w) - (pol_l - ref_l)]; ``reward_accuracy``
    the fraction of pairs whose margin is > 0 (0 at the reference, where every margin is 0);
    ``chosen_elbo_delta`` / ``rejected_elbo_delta`` are B_theta - B_ref of each response (nats,
    without beta).
    """
    B = out.score.shape[0]
    delta = (out.policy - out.reference).detach()  # (2B,) chosen rows then rejected rows
    score = out.score.detach()  # (B,)
    return {
        "vrpo/reward_margin": score.mean(),
        "vrpo/reward_accuracy": (score > 0).float().mean(),
        "vrpo/chosen_elbo_delta": delta[:B].mean(),
        "vrpo/rejected_elbo_delta": delta[B:].mean(),
    }
