"""Rollouts for ESPO: G completions per prompt from any registered sampler, then rewards.

The sampler runs on the bare module without gradients. Under ZeRO-3 its weights are
gathered for the whole rollout (``GatheredParameters``), as TRL does for generation: an
adaptive sampler may take a different number of passes on each rank, which partitioned
weights (one all-gather per layer per pass) could not survive.

The rollout RNG is keyed by (run seed, decode.seed, round, first global prompt position),
so a resumed run, or a rank that redoes a round, draws the same completions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llada_train.data.prompts import PromptDataConfig, PromptSet
from llada_train.errors import LladaError
from llada_train.eval.decode import DecodeConfig, DecodeRequest, method_of
from llada_train.keyed_random import derive_key
from llada_train.rl.rewards import RewardFn, load_reward, score

_ROLLOUT_STREAM = 0x524F


@dataclass
class Rollouts:
    """N = B x G completions of one micro-batch's B prompts, prompt-major."""

    x0: torch.Tensor  # (N, L) prompt + completion, right-padded with EOS (scored as response)
    prompt_len: torch.Tensor  # (N,)
    completion_index: torch.Tensor  # (N,) global: prompt position x G + g
    rewards: torch.Tensor  # (N,) fp32
    accuracy: torch.Tensor  # (N,) fp32, 1 = exact match
    completion_len: torch.Tensor  # (N,) tokens before the first stop token
    texts: list[str]
    seconds: float  # generation + rewards

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) tokens each ELBO scores: everything after the prompt."""
        return self.x0.shape[1] - self.prompt_len


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Full weights on every rank while inside (ZeRO-3); nothing to do otherwise."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


class RolloutTask:
    """The sampler, the prompts' records and the rewards: everything a rollout needs."""

    def __init__(
        self,
        decode_cfg: DecodeConfig,
        data_cfg: PromptDataConfig,
        prompts: PromptSet,
        seed: int,
        mask_token_id: int,
        eos_token_id: int,
        eot_token_id: int | None,
        decode_text: Any,  # ids -> text, cut at the first stop token
    ) -> None:
        self.decode_cfg, self.prompts, self.seed = decode_cfg, prompts, seed
        self.method = method_of(decode_cfg)
        self.mask_token_id, self.eos, self.eot = mask_token_id, eos_token_id, eot_token_id
        self.decode_text = decode_text
        self.rewards: list[tuple[str, float, RewardFn]] = [
            (r.path, r.weight, load_reward(r.path)) for r in data_cfg.rewards
        ]
        self.accuracy_path = data_cfg.accuracy
        self.accuracy = load_reward(data_cfg.accuracy)

    def _generate(
        self, module: nn.Module, ids: torch.Tensor, attention: torch.Tensor, key: int
    ) -> tuple[torch.Tensor, list[str]]:
        generator = torch.Generator(device=ids.device).manual_seed(key & ((1 << 63) - 1))
        request = DecodeRequest(
            ids, attention, self.mask_token_id, self.eos, self.eot, self.decode_text,
            lambda _text: None, generator=generator,
        )
        with gathered(module), torch.no_grad():
            result = self.method.run(module, self.decode_cfg, request)
        if result.generated is None:
            raise LladaError(
                f"decode={self.decode_cfg.method} gives texts, not one token canvas per row: "
                "rollouts need the ids; use low_confidence, random, med, threshold, block or tolerator"
            )
        return result.generated, result.texts

    def _rows(
        self, prompts: Sequence[list[int]], generated: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows prompt + completion (everything after the first stop token set to EOS, the
        SFT records' padding), right-padded with EOS; (x0, prompt_len, completion_len)."""
        stops = [t for t in (self.eos, self.eot) if t is not None]
        gen = generated.cpu().clone()  # (N, G)
        is_stop = torch.isin(gen, torch.tensor(stops))  # (N, G)
        first = torch.where(is_stop.any(1), is_stop.float().argmax(1), gen.shape[1])  # (N,)
        after = torch.arange(gen.shape[1])[None, :] > first[:, None]  # (N, G)
        gen[after] = self.eos
        width = max(len(p) for p in prompts) + gen.shape[1]
        x0 = torch.full((len(prompts), width), self.eos, dtype=torch.long)
        for i, p in enumerate(prompts):
            x0[i, : len(p)] = torch.tensor(p)
            x0[i, len(p) : len(p) + gen.shape[1]] = gen[i]
        prompt_len = torch.tensor([len(p) for p in prompts])
        return x0, prompt_len, first

    def rollout(
        self,
        module: nn.Module,
        batch: dict[str, torch.Tensor],
        group_size: int,
        round_: int,
    ) -> Rollouts:
        """G completions per prompt of ``batch`` (the prompt reader's), with their rewards."""
        start = time.perf_counter()
        ids, attention = batch["input_ids"], batch["attention_mask"]  # (B, P)
        positions, records = batch["sample_index"].cpu(), batch["record_index"].cpu()
        key = derive_key(self.seed, self.decode_cfg.seed, round_, int(positions[0]), _ROLLOUT_STREAM)
        generated, texts = self._generate(
            module,
            ids.repeat_interleave(group_size, 0),  # (B G, P) prompt-major
            attention.repeat_interleave(group_size, 0),
            key,
        )
        record_of = records.repeat_interleave(group_size).tolist()  # (N,)
        prompts = [self.prompts.prompt_ids[r] for r in record_of]
        x0, prompt_len, completion_len = self._rows(prompts, generated)
        rewards, accuracy = [], []
        for text, r in zip(texts, record_of, strict=True):
            record, where = self.prompts.records[r], self.prompts.where[r]
            rewards.append(sum(w * score(fn, p, text, record, where) for p, w, fn in self.rewards))
            accuracy.append(score(self.accuracy, self.accuracy_path, text, record, where))
        g = torch.arange(group_size).repeat(len(positions))  # (N,)
        return Rollouts(
            x0=x0.to(ids.device),
            prompt_len=prompt_len.to(ids.device),
            completion_index=positions.repeat_interleave(group_size) * group_size + g,
            rewards=torch.tensor(rewards, dtype=torch.float32),
            accuracy=torch.tensor(accuracy, dtype=torch.float32),
            completion_len=completion_len,
            texts=texts,
            seconds=time.perf_counter() - start,
        )
