"""The one training loop for pre-training and SFT; the objective and data are plugged in."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from llada_train.diffusion.forward import NoiseKey
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig
from llada_train.model.moe import expert_metrics, update_expert_bias
from llada_train.train import checkpointing as ckpt
from llada_train.train.guard import BadStepCounter, StepSums, StepVerdict
from llada_train.train.metrics import (
    LoggingConfig,
    MetricsLogger,
    ThroughputMeter,
    flops_per_token,
    memory_gib,
)
from llada_train.train.optim import OptimConfig, build_optimizer
from llada_train.train.parts import RunContext, TrainerParts
from llada_train.train.preemption import PreemptionFlag
from llada_train.train.schedule import ScheduleConfig, block_size_at, lr_at


@dataclass
class TrainerConfig:
    """Loop settings: batch arithmetic, length, checkpoints, guards."""

    max_steps: int = 100
    epochs: float = 0.0  # > 0: max_steps = ceil(epochs x records / global batch) (SFT data)
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 16  # sequences per rank per forward
    seq_len: int = 128
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    export_at_end: bool = True  # consolidated safetensors export in run_dir/export
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"
    max_bad_steps: int = 5  # consecutive skipped (non-finite) optimizer steps before the run stops
    peak_flops_per_device: float = 989e12  # H100 dense bf16; MFU's denominator (CUDA only)
    # validation on held-out data (data.val_path / data.val_fraction); 0 = off
    eval_every: int = 0  # steps between evaluations (and at the last step)
    eval_windows: int = 64  # held-out windows (SFT: records) scored per evaluation
    eval_samples_per_window: int = 8  # stratified noisy copies of each


@dataclass
class LoopConfigs:
    """The sub-configs the trainer reads (the root config's groups of the same names)."""

    trainer: TrainerConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    logging: LoggingConfig


@dataclass
class TrainResult:
    """What a finished (or pre-empted) run reports back."""

    final_step: int
    losses: list[float]  # logged mean loss per step, in order
    preempted: bool


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 on GPU, fp32 on CPU unless set explicitly."""
    if precision not in ("auto", "bf16", "fp32"):
        raise LladaError(f"trainer.precision={precision!r}; use auto, bf16 or fp32")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


class Trainer:
    """DeepSpeed engine, LR schedule by tokens, NaN guard, checkpoints, resume, metrics.

    ``ds_config`` is the DeepSpeed JSON the entry point rendered once (the model was built
    with the same dict, which matters under ZeRO-3).
    """

    def __init__(
        self, parts: TrainerParts, cfgs: LoopConfigs, ds_config: dict[str, Any], run: RunContext
    ) -> None:
        import deepspeed

        self.cfg, self.schedule, self.logging = cfgs.trainer, cfgs.schedule, cfgs.logging
        self.model_cfg, self.objective, self.reader = parts.model_cfg, parts.objective, parts.reader
        self.dist, self.run, self.validator = parts.dist, run, parts.validator
        self.preemption = parts.preemption or PreemptionFlag()
        self.rank0 = self.dist.rank == 0
        self.ds_config = ds_config
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.grad_accum = int(ds_config["gradient_accumulation_steps"])
        self.optimizer = build_optimizer(parts.model, cfgs.optim, cfgs.schedule.peak_lr)
        self.engine, _, _, _ = deepspeed.initialize(
            model=parts.model, optimizer=self.optimizer, config=ds_config
        )
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in parts.model.parameters())
        # Masks come from NoiseKey(seed, step) and each row's global sample index, whatever the
        # topology; this per-rank stream only serves readers that give no sample index.
        self.generator = torch.Generator(device=self.dist.device).manual_seed(
            run.seed * 1_000_003 + self.dist.rank
        )
        self.step = 0
        self.tokens = 0.0
        self.batches_drawn = 0
        self.bad_steps = BadStepCounter(self.cfg.max_bad_steps)
        self._grad_norm: torch.Tensor | None = None  # stage 0 measures it (see _measure_grads)
        self._lr = math.nan
        self._block: int | None = None  # the block-size curriculum's value this step (None: off)
        self._stop_requested = False
        self._objective_metrics: dict[str, float] = {}  # the last step's LossOutput.metrics means
        self.metrics = MetricsLogger(run.run_dir, self.rank0, self.logging, run.config_dict)

    # ---- state -------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        """Rank-independent state saved with each checkpoint (``trainer_state.json``)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "batches_drawn": self.batches_drawn,
            "skipped_steps": self.bad_steps.skipped,
            "world_size": self.dist.world_size,
            "zero_stage": self.zero_stage,
            "global_batch_size": self.cfg.global_batch_size,
            # masks are hashes of (seed, step, global sample index): nothing per rank to restore
            "mask_draws": "seed-step-index",
        }

    def rank_state(self) -> dict[str, Any]:
        """This rank's state: reader position and random generators."""
        state = {
            "reader": self.reader.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if hasattr(self.objective, "state_dict"):  # e.g. ESPO's rollouts of the current round
            state["objective"] = self.objective.state_dict()
        return state

    def save(self) -> None:
        """Collective checkpoint; refuses non-finite weights."""
        if not ckpt.parameters_finite(self.engine, self.dist.device):
            raise LladaError(
                f"weights are non-finite at step {self.step}: refusing to write a checkpoint"
            )
        path = ckpt.save_checkpoint(
            self.engine, self.run.run_dir, self.step, self.trainer_state(), self.rank_state(),
            self.cfg.keep_last,
        )
        if self.rank0:
            print(f"checkpoint saved: {path}", flush=True)

    def maybe_resume(self) -> bool:
        """Auto-resume from ``run_dir/checkpoints/latest`` when it exists."""
        tag = ckpt.latest_tag(self.run.run_dir)
        if tag is None:
            return False
        state, rank_state = ckpt.load_checkpoint(self.engine, self.run.run_dir, tag)
        self.step, self.tokens = state["step"], state["tokens"]
        self.batches_drawn = state["batches_drawn"]
        # checkpoints written before the guard skipped whole steps counted micro-batches
        self.bad_steps.skipped = state.get("skipped_steps", state.get("skipped_batches", 0))
        self.reader.load_state_dict(rank_state["reader"])
        if "generator" in rank_state:  # absent after a resume on another world size
            self.generator.set_state(rank_state["generator"])  # only for readers without indices
        if "mask_draws" not in state and self.rank0:
            print("note: this checkpoint predates masks keyed by (seed, step, sample index); "
                  "the resumed steps draw keyed masks, not its per-rank generator stream",
                  flush=True)
        if "torch_rng" in rank_state:
            torch.set_rng_state(rank_state["torch_rng"])
        if "objective" in rank_state and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(rank_state["objective"])
        if self.rank0:
            where = ckpt.checkpoint_dir(self.run.run_dir) / tag
            print(f"resumed from {where} at step {self.step}", flush=True)
        return True

    # ---- the step ----------------------------------------------------------------------
    def _next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self.reader)
        self.batches_drawn += 1
        device = self.dist.device
        if device.type == "cuda":  # pinned host memory lets the copy overlap compute
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(device) for k, v in batch.items()}

    def _micro_batch(self, sums: StepSums) -> None:
        """One forward/backward; the loss stays on the device."""
        batch = self._next_batch()
        keyed = "sample_index" in batch
        noise = NoiseKey(self.run.seed, self.step, self._block) if keyed else self.generator
        out = self.objective(self.engine, batch, noise)
        self.engine.backward(out.loss)
        sums.add(out.loss, out.num_tokens, out.metrics)

    def _measure_grads(self, sums: StepSums) -> None:
        """Stage 0: the gradient norm before the update, so a non-finite one is skipped too.

        DeepSpeed's plain fp32 path neither records the norm nor checks it; its ZeRO and bf16
        optimizers check it themselves and skip (seen through ``engine.skipped_steps``).
        """
        if self.zero_stage != 0:
            return
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if grads:  # after the boundary all-reduce: identical on every rank
            self._grad_norm = torch.nn.utils.get_total_norm(grads)
            sums.flag_nonfinite(self._grad_norm)

    def _attempt(self) -> tuple[StepVerdict, bool]:
        """One optimizer step's micro-batches and update; returns (verdict, skipped)."""
        sums = StepSums(self.dist.device)
        for _ in range(self.grad_accum - 1):
            self._micro_batch(sums)
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        self._micro_batch(sums)
        self._measure_grads(sums)
        verdict = sums.agree(self.preemption.requested)
        skipped_before = self.engine.skipped_steps
        self.optimizer.skip = verdict.nonfinite  # DeepSpeed still clears grads and counts
        try:
            self.engine.step()
        finally:
            self.optimizer.skip = False
        return verdict, verdict.nonfinite or self.engine.skipped_steps != skipped_before

    def train_step(self) -> float:
        """One optimizer step of ``grad_accum`` micro-batches per rank; returns the mean loss.

        A step whose loss or gradient is non-finite on any rank is skipped on all ranks,
        counted, and redone on the next batches; ``max_bad_steps`` in a row stop the run.
        """
        self._lr = lr_at(self.schedule, self.step, self.tokens, self.cfg.max_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self._lr
        self._set_block_size()
        while True:
            verdict, skipped = self._attempt()
            self._stop_requested = verdict.stop_requested
            if skipped and self.rank0:
                print(f"warning: non-finite loss or gradient in step {self.step + 1} "
                      f"(up to batch {self.batches_drawn}); step skipped", flush=True)
            self.bad_steps.record(skipped, self.step)
            if not skipped:
                break
        self._objective_metrics = verdict.metrics  # agreed in the step's one all-reduce
        if self.model_cfg.num_experts:  # MoE balancing from this step's load
            update_expert_bias(self.engine.module)
        self.step += 1
        # tokens the model actually saw (SFT batches and 1% cuts are shorter than seq_len)
        self.tokens += verdict.tokens
        return verdict.mean_loss

    def _set_block_size(self) -> None:
        """The schedule's block size for this step (a function of tokens, so a resume lands in
        the same phase); it reaches the objective through the step's ``NoiseKey``."""
        size = block_size_at(self.schedule, self.tokens)
        if size != self._block and size is not None and self.rank0:
            before = "" if self._block is None else f"{self._block or 'L'} -> "
            print(f"block size {before}{size or 'L'} at step {self.step + 1} "
                  f"({self.tokens:.4g} tokens)", flush=True)
        self._block = size

    def _export_config(self) -> ModelConfig:
        """The model config the export records: the curriculum's last block size, if any."""
        if self._block is None:
            self._block = block_size_at(self.schedule, self.tokens)
        if self._block is None:
            return self.model_cfg
        return dataclasses.replace(self.model_cfg, block_size=self._block)

    def _grad_norm_value(self) -> float:
        norm = self.engine.get_global_grad_norm()
        norm = self._grad_norm if norm is None else norm
        return math.nan if norm is None else float(norm)

    def _validate(self, meter: ThroughputMeter) -> dict[str, float]:
        """Validation metrics at every ``eval_every``-th and the last step, else {}.

        Its time is left out of the throughput window; it reads no training RNG or batch.
        """
        every = self.cfg.eval_every
        if self.validator is None or not every:
            return {}
        if self.step % every and self.step < self.cfg.max_steps:
            return {}
        start = time.perf_counter()
        out = self.validator.run(self.engine).metrics()
        meter.exclude(time.perf_counter() - start)
        return out

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run to ``max_steps`` (resuming if a checkpoint exists), save, export."""
        resumed = self.maybe_resume()
        start_step = self.step
        logged: list[float] = []
        preempted = False
        on_cuda = self.dist.device.type == "cuda"  # MFU means nothing on CPU: not reported
        meter = ThroughputMeter(
            self.cfg.global_batch_size,
            self.dist.world_size,
            flops_per_token(self.model_cfg, self.cfg.seq_len) if on_cuda else None,
            self.cfg.peak_flops_per_device,
        )
        bar = tqdm(
            total=self.cfg.max_steps,
            initial=self.step,
            disable=not (self.rank0 and self.logging.progress_bar),
            desc="train",
            dynamic_ncols=True,
        )
        meter.restart(self.step, self.tokens)
        try:  # an error ends the bar's line first, so its one line starts a line
            while self.step < self.cfg.max_steps:
                loss = self.train_step()
                logged.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                first = len(logged) == 1
                val = self._validate(meter)  # merged into the step's record: every row has a loss
                at_end = self.step == self.cfg.max_steps
                if val or first or self.step % self.logging.log_every == 0 or at_end:
                    self.metrics.log(
                        self.step,
                        {
                            "loss": loss,
                            "lr": self._lr,
                            "grad_norm": self._grad_norm_value(),
                            **meter.report(self.step, self.tokens),
                            "mem_gib": memory_gib(self.dist.device),
                            "tokens": self.tokens,
                            "skipped_steps": self.bad_steps.skipped,
                            **({} if self._block is None else {"block_size": self._block}),
                            **val,
                            **self._objective_metrics,  # the objective's own (e.g. vrpo/...)
                            **(expert_metrics(self.engine.module) if self.model_cfg.num_experts else {}),
                        },
                        echo=not self.logging.progress_bar or bool(val),
                    )
                every = self.cfg.save_every
                if every and self.step % every == 0 and self.step < self.cfg.max_steps:
                    self.save()
                if self._stop_requested:  # agreed by all ranks in the step's one all-reduce
                    if self.rank0:
                        print(f"pre-emption signal received: checkpointing at step {self.step}",
                              flush=True)
                    preempted = True
                    break
        finally:
            bar.close()
        if self.step > start_step or not resumed:
            self.save()
        elif self.rank0:  # e.g. a finished run started again: its checkpoint is the last word
            print(f"nothing to train since the checkpoint at step {self.step}: "
                  "not saving it again", flush=True)
        if not preempted and self.cfg.export_at_end:
            out = self.run.run_dir / "export"
            ckpt.export_from_engine(
                self.engine, self.zero_stage, self._export_config(), out, self.run.tokenizer
            )
            if self.rank0:
                print(f"exported model (safetensors + config.json) to {out}", flush=True)
        self.metrics.close()
        return TrainResult(self.step, logged, preempted)
