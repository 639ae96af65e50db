"""Block diffusion (SPEC §8; BD3-LM, arXiv 2503.09573; LLaDA 2.0 §4-5): ``objective=block``.

The sequence is cut into blocks of ``B`` tokens; block b is a masked diffusion conditioned on
the clean blocks < b. Training runs ``cat(x_t, x_0)`` (2L positions) once, with the
block-diffusion attention rule (``model/masks.py``), and the masked-row chunked head on the
x_t half. One block (``block_size`` 0, or >= the length) runs the plain 1L pass instead and
is exactly the full-diffusion objective of SPEC §2 / §3 on the same noise.

Noise is keyed like the other objectives' (``NoiseKey``: seed, step, global sample index),
so ranks and micro-batch sizes draw the same masks. t column 0 is the full-sequence
objectives' t, the per-token draws are theirs, and the 1% length cut is theirs (rounded down
to whole blocks), which is what makes one block reproduce them exactly.

Pre-training rows: loss = sum over masked tokens of w * CE / (B_rows * L). SFT rows (a
``prompt_len`` in the batch): the prompt is never masked, rows are padded with EOS to a block
multiple (the padding is response, as in SPEC §3), and the normaliser is ans_len * B_rows.
w = 1 / p (``weight=inverse_p``) or 1 (``uniform``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llada_train.diffusion.forward import NoiseKey
from llada_train.diffusion.losses import masked_head_loss
from llada_train.diffusion.objective_base import LossOutput, ObjectiveConfig
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig
from llada_train.model.masks import check_block_size


class Draws:
    """The step's random numbers from a ``NoiseKey`` (keyed by sample index) or a generator.

    A generator draws in the full-sequence objectives' order (cut, t, tokens, prompt drop),
    so one block reproduces their stream too; per-block strata come after the tokens.
    """

    def __init__(self, noise: NoiseKey | torch.Generator, index: torch.Tensor | None, rows: int) -> None:
        self.noise, self.index, self.rows = noise, index, rows
        self.keyed = isinstance(noise, NoiseKey)
        if self.keyed and index is None:
            raise LladaError("objective=block with a NoiseKey needs batch['sample_index']")

    def _rand(self, *shape: int) -> torch.Tensor:
        g = self.noise
        return torch.rand(shape, generator=g, device=g.device).cpu()

    def cut(self, length: int, prob: float) -> int:
        """The step's length (the paper's 1% variable-length batches)."""
        if self.keyed:
            return self.noise.cut_length(length, prob)
        g = self.noise
        coin = torch.rand((), generator=g, device=g.device).item()
        new_len = int(torch.randint(1, length + 1, (), generator=g, device=g.device).item())
        return new_len if coin < prob else length

    def t(self, width: int) -> torch.Tensor:
        """(B, width) uniform t, one per block."""
        return self.noise.t_uniforms(self.index, width) if self.keyed else self._rand(self.rows, width)

    def tokens(self, length: int) -> torch.Tensor:
        """(B, length) per-token uniforms."""
        return self.noise.token_uniforms(self.index, length) if self.keyed else self._rand(self.rows, length)

    def drop(self) -> torch.Tensor:
        """(B,) uniforms for dropping prompts (CFG training)."""
        return self.noise.drop_uniforms(self.index) if self.keyed else self._rand(self.rows)

    def strata(self, width: int) -> torch.Tensor:
        """(B, width) uniforms whose ranks order the strata of a row's blocks."""
        return self.noise.strata_uniforms(self.index, width) if self.keyed else self._rand(self.rows, width)


def stratify(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Antithetic t across a row's blocks: block k gets ``(t_k + s_k) / n`` with ``s`` a random
    permutation of 0..n-1 (from ``order``'s ranks), so every row covers each stratum of [0, 1)
    once. BD3-LM stratifies over the batch's (row, block) grid; per row keeps the draws a
    function of the sample alone (the same on any rank or micro-batch)."""
    n = t.shape[1]
    rank = order.argsort(dim=1).argsort(dim=1).to(t.dtype)  # (B, n) a permutation per row
    return (t + rank) / n


@dataclass
class BlockBatch:
    """One noised batch: targets, the two halves' inputs, masks and per-token weights."""

    x0: torch.Tensor  # (B, L) targets
    clean: torch.Tensor  # (B, L) the x_0 half's input (x0, or with a dropped prompt as MASK)
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (noisy, masked, weight) (B, L)
    block: int  # the block size; 0 = one block (the 1L pass)
    docs: torch.Tensor | None  # (B, L) document ids


class BlockObjective:
    """BD3-LM's NELBO over ``cat(x_t, x_0)``, for pre-training and SFT batches (see module)."""

    def __init__(self, cfg: ObjectiveConfig, mask_token_id: int, eos_token_id: int | None = None) -> None:
        self.cfg, self.mask_token_id, self.eos_token_id = cfg, mask_token_id, eos_token_id

    @classmethod
    def prepare(
        cls, cfg: ObjectiveConfig, model_cfg: ModelConfig, seq_len: int, curriculum: list[int]
    ) -> ModelConfig:
        """Start-up: a bidirectional model, block sizes that tile ``trainer.seq_len``; the
        model config records the block size it ends with (the export is a block model)."""
        if model_cfg.causal:
            raise LladaError(
                "objective=block needs a bidirectional model: set model.causal=false (a causal "
                "model cannot see the rest of its noisy block; an AR checkpoint converted with "
                "llada-convert trains as block diffusion with model.causal=false)"
            )
        if cfg.block_size:
            check_block_size(cfg.block_size, seq_len, "objective.block_size")
        for i, size in enumerate(curriculum):
            if size:
                check_block_size(size, seq_len, f"schedule.block_phases[{i}]")
        final = curriculum[-1] if curriculum else cfg.block_size
        return dataclasses.replace(model_cfg, block_size=final)

    def block_size(self, noise: NoiseKey | torch.Generator) -> int:
        """The step's block size: the curriculum's (carried by the NoiseKey) or the config's."""
        if isinstance(noise, NoiseKey) and noise.block_size is not None:
            return noise.block_size
        return self.cfg.block_size

    # ---- noise ---------------------------------------------------------------------------
    def _tokens(self, batch: dict[str, torch.Tensor], draws: Draws, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0 (B, L), prompt_len or None): pre-training rows cut to whole blocks, SFT rows
        padded with EOS to a block multiple."""
        ids = batch["input_ids"]  # (B, L0)
        L0 = ids.shape[1]
        if "prompt_len" in batch:
            if 0 < block < L0 and L0 % block:
                if self.eos_token_id is None:
                    raise LladaError("objective=block pads SFT rows with EOS: build it with eos_token_id")
                pad = ids.new_full((ids.shape[0], -L0 % block), self.eos_token_id)
                ids = torch.cat([ids, pad], dim=1)  # (B, L) EOS padding is response (SPEC §3)
            return ids, batch["prompt_len"].to(ids.device)
        if 0 < block < L0 and L0 % block:
            raise LladaError(
                f"objective=block: block size {block} does not divide the batch length {L0}; "
                "pick a block size that divides trainer.seq_len"
            )
        L = draws.cut(L0, self.cfg.var_len_prob)
        if 0 < block < L:
            L = L // block * block  # a cut keeps whole blocks
        return ids[:, :L], None

    def draw(self, batch: dict[str, torch.Tensor], noise: NoiseKey | torch.Generator) -> BlockBatch:
        """The noised batch (its views: one, or two with ``complementary``)."""
        cfg = self.cfg
        draws = Draws(noise, batch.get("sample_index"), batch["input_ids"].shape[0])
        block = self.block_size(noise)
        x0, prompt_len = self._tokens(batch, draws, block)
        B, L = x0.shape
        dev = x0.device
        block = block if 0 < block < L else 0  # one block: the plain 1L pass
        n = L // block if block and cfg.t_per == "block" else 1
        t = draws.t(n)  # (B, n)
        u = draws.tokens(L).to(dev)  # (B, L)
        if n > 1 and cfg.antithetic:
            t = stratify(t, draws.strata(n))
        if (cfg.mask_ratio_min, cfg.mask_ratio_max) != (0.0, 1.0):
            t = cfg.mask_ratio_min + (cfg.mask_ratio_max - cfg.mask_ratio_min) * t
        p = ((1 - cfg.eps) * t + cfg.eps).to(dev)  # (B, n)
        p = p.repeat_interleave(L // n, dim=1) if n > 1 else p.expand(B, L)  # (B, L)
        clean, maskable, ans = x0, None, None
        if prompt_len is not None:
            maskable = torch.arange(L, device=dev)[None, :] >= prompt_len[:, None]  # (B, L)
            ans = (L - prompt_len).clamp(min=1).to(torch.float32)[:, None]  # (B, 1) padding included

        def weigh(prob: torch.Tensor) -> torch.Tensor:  # (B, L); the §2 / §3 formulas' op order
            if cfg.weight == "uniform":
                prob = torch.ones_like(prob)
            return 1.0 / (prob * (B * L)) if ans is None else 1.0 / (prob * ans * B)

        masked = u < p if maskable is None else (u < p) & maskable
        views = [(masked, p)]
        if cfg.complementary:
            inverted = ~masked if maskable is None else ~masked & maskable
            views.append((inverted, (1 - p).clamp(min=cfg.eps)))
        mask_id = self.mask_token_id
        drop = None
        if prompt_len is not None and cfg.p_uncond > 0:
            drop = ~maskable & (draws.drop().to(dev) < cfg.p_uncond)[:, None]  # (B, L) prompt
            clean = torch.where(drop, torch.full_like(x0, mask_id), x0)
        out = []
        for m, prob in views:
            noisy = torch.where(m, torch.full_like(x0, mask_id), x0)
            if drop is not None:
                noisy = torch.where(drop, torch.full_like(noisy, mask_id), noisy)
            out.append((noisy, m, weigh(prob)))
        docs = batch.get("document_ids")
        docs = None if docs is None or prompt_len is not None else docs[:, :L]  # cut like x0
        return BlockBatch(x0, clean, out, block, docs)

    # ---- the loss -----------------------------------------------------------------------
    def __call__(self, model: Any, batch: dict[str, torch.Tensor], noise: NoiseKey | torch.Generator) -> LossOutput:
        d = self.draw(batch, noise)
        k = len(d.views)
        noisy = torch.cat([v[0] for v in d.views])  # (kB, L)
        masked = torch.cat([v[1] for v in d.views])
        weight = torch.cat([v[2] for v in d.views])  # (kB, L)
        if k > 1:
            weight = weight / k  # the views' mean: each is an estimate of the same bound
        x0 = d.x0.repeat(k, 1)  # (kB, L)
        docs = None if d.docs is None else d.docs.repeat(k, 1)
        paired = d.block > 0
        inp = torch.cat([noisy, d.clean.repeat(k, 1)], dim=1) if paired else noisy  # (kB, 2L | L)
        # an upper bound on the masked rows that is the same every pre-training step (ZeRO-3)
        max_rows = k * max(batch["input_ids"].numel(), d.x0.numel())
        with self._embed_noise(model, noise, batch, inp):
            loss = masked_head_loss(
                model, inp, x0, masked, weight, self.cfg.loss_chunk_rows, max_rows, docs,
                block_size=d.block, paired=paired,
            )
        return LossOutput(loss, d.x0.numel(), masked.sum())

    @contextlib.contextmanager
    def _embed_noise(
        self, model: Any, noise: NoiseKey | torch.Generator, batch: dict[str, torch.Tensor], inp: torch.Tensor
    ) -> Iterator[None]:
        """LLaDA 2.0 §7.1: N(0, std^2) added to the MASK positions' embedding output during
        the first ``mask_embed_noise_steps`` steps (keyed per sample; needs a NoiseKey)."""
        cfg = self.cfg
        if not (cfg.mask_embed_noise_std > 0 and isinstance(noise, NoiseKey)
                and noise.step < cfg.mask_embed_noise_steps):
            yield
            return
        wte = getattr(model, "module", model).transformer.wte
        index = batch["sample_index"].repeat(inp.shape[0] // batch["sample_index"].shape[0])
        is_mask = (inp == self.mask_token_id)[..., None]  # (kB, L', 1)

        def add(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            z = noise.embed_noise(index, tuple(out.shape[1:])).to(out.device, out.dtype)
            return out + cfg.mask_embed_noise_std * z * is_mask

        handle = wte.register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()
