"""Trainer speed and ZeRO memory, each against a bare baseline measured in the same run.

    python benchmarks/train_bench.py [--steps 30] [--skip-memory]

Rows:
- trainer tokens/s vs a bare PyTorch loop (same model, objective, batch, AdamW, clipping) on
  this machine's device, one process; blocks of steps alternate A/B to share the noise;
- per-rank memory of ZeRO-3 vs ZeRO-0 with 2 ranks (torchrun, gloo on CPU, ~113M params, 2 steps):
  peak growth of the resident set (the target row), its growth at the end, and bytes of model
  states (parameters, gradients, optimizer) at the end, where ZeRO-0 has freed its gradients but
  ZeRO-3 keeps its gradient partition buffer (and, on CPU, an fp32 copy of an fp32 partition),
  so the end-state ratio cannot go below ~0.83 (fp32) / ~0.57 (bf16) at any model size;
- one fwd+bwd step of a model with the real 126,464 vocabulary (d 256, 2 layers, 2 x 1024):
  the old full-logits loss vs the masked-row chunked loss, each in a fresh process: peak
  resident growth during the step (the loss path dominates it) and step time;
- block diffusion (objective=block, block 32) vs full diffusion step time at the same tokens:
  fwd + bwd + AdamW of the tiny model in one process, alternating blocks of steps; the 2L
  input doubles every layer's work, so ~2x is expected (README "Block diffusion");
- on a CUDA machine: MFU of `llada_1b` at sequence 4096 in bf16 on one GPU, SDPA vs flash-attn
  (benchmarks/gpu_bench.py has the full GPU table).

    python benchmarks/train_bench.py --skip-speed --skip-memory   # the loss-path rows alone
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llada_train.config import LoggingConfig, OptimConfig, TrainerConfig  # noqa: E402
from llada_train.diffusion import ObjectiveConfig, PretrainObjective  # noqa: E402
from llada_train.model import LLaDAModel, ModelConfig  # noqa: E402
from llada_train.train.distributed import (  # noqa: E402
    DeepSpeedConfig,
    init_distributed,
    render_deepspeed_config,
)
from llada_train.train.loop import LoopConfigs, Trainer  # noqa: E402
from llada_train.train.parts import RunContext, TrainerParts  # noqa: E402
from llada_train.train.schedule import ScheduleConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import full_logits_loss  # noqa: E402  (torch-only module)


class RandomTokens:
    """A reader of random windows with the trainer's reader interface."""

    def __init__(self, batch: int, seq_len: int, vocab: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.shape, self.vocab, self.drawn = (batch, seq_len), vocab, 0

    def __next__(self) -> dict[str, torch.Tensor]:
        self.drawn += 1
        return {"input_ids": torch.randint(3, self.vocab, self.shape, generator=self.g)}

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]


def make_model(cfg: ModelConfig, seed: int = 0) -> LLaDAModel:
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def bench_speed(steps: int, blocks: int, batch: int, seq_len: int) -> tuple[float, float]:
    """(trainer tokens/s, bare-loop tokens/s) for the `tiny` shape on this device."""
    info = init_distributed()
    cfg = ModelConfig()  # the tiny preset's shape
    objective = PretrainObjective(ObjectiveConfig(var_len_prob=0.0), cfg.mask_token_id)
    run_dir = Path(tempfile.mkdtemp(prefix="train_bench_"))
    trainer = Trainer(
        TrainerParts(model=make_model(cfg), model_cfg=cfg, objective=objective,
                     reader=RandomTokens(batch, seq_len, cfg.vocab_size, 0), dist=info),
        LoopConfigs(
            trainer=TrainerConfig(max_steps=10**9, global_batch_size=batch, micro_batch_size=batch,
                                  seq_len=seq_len),
            optim=OptimConfig(), schedule=ScheduleConfig(name="constant", peak_lr=1e-3, warmup_steps=1),
            logging=LoggingConfig(progress_bar=False),
        ),
        render_deepspeed_config(DeepSpeedConfig(zero_stage=0), batch, batch, info.world_size, 1.0,
                                bf16=False),
        RunContext(run_dir, seed=0),
    )
    bare = make_model(cfg).to(info.device)
    opt = torch.optim.AdamW(bare.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    reader = RandomTokens(batch, seq_len, cfg.vocab_size, 1)
    gen = torch.Generator(device=info.device).manual_seed(0)

    def bare_step() -> None:
        batch_ = {k: v.to(info.device) for k, v in next(reader).items()}
        loss = objective(bare, batch_, gen).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up both paths
        trainer.train_step()
        bare_step()
    t_ours = t_bare = 0.0
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        t_ours += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            bare_step()
        t_bare += time.perf_counter() - t0
    tokens = blocks * steps * batch * seq_len
    return tokens / t_ours, tokens / t_bare


def bench_block(steps: int, blocks: int, batch: int, seq_len: int, block: int,
                complementary: bool = False) -> tuple[float, float]:
    """(block, full) seconds per step of the tiny model: fwd + bwd + AdamW, one process, the
    same batches and keyed noise; A/B blocks of steps alternate so both share the noise."""
    from llada_train.diffusion.block import BlockObjective
    from llada_train.diffusion.forward import NoiseKey

    cfg = ModelConfig()  # the tiny preset's shape
    full = PretrainObjective(ObjectiveConfig(var_len_prob=0.0), cfg.mask_token_id)
    blk = BlockObjective(ObjectiveConfig(name="block", block_size=block, var_len_prob=0.0,
                                         complementary=complementary), cfg.mask_token_id)
    runs = {}
    for name, objective in (("block", blk), ("full", full)):
        model = make_model(cfg)
        runs[name] = (objective, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    data = RandomTokens(batch, seq_len, cfg.vocab_size, 0)
    batches = [{**next(data), "sample_index": torch.arange(i * batch, (i + 1) * batch)}
               for i in range(steps)]

    def run(name: str) -> float:
        objective, model, opt = runs[name]
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            objective(model, b, NoiseKey(0, i)).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    run("block"), run("full")  # warm-up
    t = {"block": 0.0, "full": 0.0}
    for _ in range(blocks):
        for name in t:
            t[name] += run(name)
    return t["block"] / (blocks * steps), t["full"] / (blocks * steps)


def bench_memory(precision: str, world: int = 2) -> dict[int, dict[str, float]]:
    """Launch the memory worker under torchrun for ZeRO-0 and ZeRO-3; max over ranks."""
    out: dict[int, dict[str, float]] = {}
    for stage in (0, 3):
        with tempfile.TemporaryDirectory() as tmp:
            # Both stages: a fixed glibc mmap threshold hands every freed tensor >= 1 MiB back at
            # once, so the peak is live memory; with glibc's sliding threshold ZeRO-3's gather
            # buffers (<= 32 MiB) come from the heap and ~100-350 MiB of freed heap stays resident.
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MEM_OUT=tmp, ZERO_STAGE=str(stage),
                       PRECISION=precision, MALLOC_MMAP_THRESHOLD_=str(2**20))
            subprocess.run(
                [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={world}",
                 str(Path(__file__).with_name("zero_memory_worker.py"))],
                env=env, check=True, capture_output=True, text=True,
            )
            rows = [json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")]
        out[stage] = {k: max(r[k] for r in rows) for k in rows[0]}
    return out


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def loss_path_worker(path: str, batch: int, seq_len: int, steps: int) -> dict[str, float]:
    """One fwd+bwd step of a big-vocabulary model on the ``old`` or ``new`` loss path.

    Runs in its own process. The peak is the resident high-water mark during the first step
    (reset just before it through /proc/self/clear_refs) minus the resident set before it;
    parameter gradients (~250 MiB here) are allocated in that step on both paths.
    """
    cfg = ModelConfig(d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=704,
                      vocab_size=126464, max_sequence_length=seq_len, bos_token_id=126080,
                      eos_token_id=126081, pad_token_id=126081, mask_token_id=126336)
    model = make_model(cfg)
    objective = PretrainObjective(ObjectiveConfig(var_len_prob=0.0), cfg.mask_token_id)
    data = {"input_ids": torch.randint(3, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))}
    masked_rows = int(objective.draw(data, torch.Generator().manual_seed(1))[2].sum())

    def step() -> float:
        gen = torch.Generator().manual_seed(1)  # the same masks every step and on both paths
        if path == "old":
            loss = full_logits_loss(model, objective, data, gen)
        else:
            loss = objective(model, data, gen).loss
        loss.backward()
        return loss.item()

    gc.collect()
    rss0 = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    peak = _rss_mib("VmHWM") - rss0
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_growth_mib": peak, "first_step_s": first, "step_s": min(times), "loss": loss,
            "masked_rows": masked_rows, "rows": batch * seq_len,
            "chunk_rows": objective.cfg.loss_chunk_rows}


def bench_loss_path(batch: int, seq_len: int, steps: int, repeats: int) -> dict[str, dict[str, float]]:
    """Old vs new loss path, alternating fresh processes; min time and max peak per path."""
    out: dict[str, dict[str, float]] = {}
    # a fixed mmap threshold returns every freed tensor >= 1 MiB at once: the peak is live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    for _ in range(repeats):
        for path in ("old", "new"):
            proc = subprocess.run(
                [sys.executable, __file__, "--loss-worker", path, "--loss-batch", str(batch),
                 "--loss-seq-len", str(seq_len), "--loss-steps", str(steps)],
                env=env, check=True, capture_output=True, text=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if path in out:
                r["step_s"] = min(r["step_s"], out[path]["step_s"])
                r["peak_growth_mib"] = max(r["peak_growth_mib"], out[path]["peak_growth_mib"])
            out[path] = r
    return out


def _gpu_tokens_per_s(cfg: ModelConfig, batch: int = 2, seq_len: int = 4096, iters: int = 10) -> float:
    """bf16 autocast training tokens/s of one model on the current GPU."""
    model = make_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    objective = PretrainObjective(ObjectiveConfig(var_len_prob=0.0), cfg.mask_token_id)
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = {"input_ids": torch.randint(3, cfg.vocab_size, (batch, seq_len), device="cuda")}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective(model, data, gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return iters * batch * seq_len / (time.perf_counter() - t0)


def bench_gpu_mfu() -> list[tuple[str, float]]:
    """MFU of llada_1b, seq 4096, bf16, one GPU: (backend, mfu) rows."""
    from omegaconf import OmegaConf

    from llada_train.train.metrics import flops_per_token

    raw = OmegaConf.load(REPO / "conf" / "model" / "llada_1b.yaml")
    rows = []
    for backend in ("sdpa", "flash"):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
        cfg.attention_backend = backend
        if backend == "flash":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                rows.append((backend, float("nan")))
                continue
        tok_s = _gpu_tokens_per_s(cfg)
        rows.append((backend, tok_s * flops_per_token(cfg, 4096) / 989e12))
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=4, help="alternating A/B blocks")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true", help="skip trainer vs bare loop")
    parser.add_argument("--skip-loss-path", action="store_true", help="skip old vs new loss path")
    parser.add_argument("--skip-block", action="store_true", help="skip block vs full diffusion")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--loss-batch", type=int, default=2)
    parser.add_argument("--loss-seq-len", type=int, default=1024)
    parser.add_argument("--loss-steps", type=int, default=1, help="timed steps per process")
    parser.add_argument("--loss-repeats", type=int, default=2, help="alternating processes per path")
    parser.add_argument("--loss-worker", choices=("old", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_worker:
        print(json.dumps(loss_path_worker(args.loss_worker, args.loss_batch, args.loss_seq_len, args.loss_steps)))
        return

    print("\n| measurement | ours | baseline | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    if not args.skip_speed:
        ours, bare = bench_speed(args.steps, args.blocks, args.batch, args.seq_len)
        print(f"| trainer tokens/s vs bare PyTorch loop (tiny, {args.batch}x{args.seq_len}, 1 process) "
              f"| {ours:,.0f} | {bare:,.0f} | {ours / bare:.3f}x | >= 0.95x |")
    if not args.skip_block:
        for comp in (False, True):
            tb, tf = bench_block(args.steps, args.blocks, args.batch, args.seq_len, args.block_size, comp)
            what = "block diffusion" + (" + complementary views" if comp else "")
            print(f"| {what} vs full diffusion step time (tiny, {args.batch}x{args.seq_len}, block "
                  f"{args.block_size}, same tokens, fwd+bwd+AdamW; s/step) | {tb:.4f} | {tf:.4f} "
                  f"| {tb / tf:.2f}x | {'~4x' if comp else '~2x'} |")
    if not args.skip_loss_path:
        lp = bench_loss_path(args.loss_batch, args.loss_seq_len, args.loss_steps, args.loss_repeats)
        new, old = lp["new"], lp["old"]
        shape = (f"V 126,464, d 256, 2 layers, {args.loss_batch}x{args.loss_seq_len}, "
                 f"{new['masked_rows']} masked rows, chunk {new['chunk_rows']} rows, fp32, fwd+bwd")
        print(f"| big-vocab step peak resident growth, masked-row chunked vs full-logits loss ({shape}; MiB) "
              f"| {new['peak_growth_mib']:,.0f} | {old['peak_growth_mib']:,.0f} "
              f"| {new['peak_growth_mib'] / old['peak_growth_mib']:.3f}x | <= 0.33x |")
        print(f"| big-vocab step time, masked-row chunked vs full-logits loss (s, min of "
              f"{args.loss_steps * args.loss_repeats}) | {new['step_s']:.3f} | {old['step_s']:.3f} "
              f"| {new['step_s'] / old['step_s']:.3f}x | <= 1.0x |")
        print(f"| big-vocab step loss, same masks (equal by construction) | {new['loss']:.5f} "
              f"| {old['loss']:.5f} | {new['loss'] / old['loss']:.6f}x | 1.0x |")
    if not args.skip_memory:
        for precision in ("fp32", "bf16"):
            mem = bench_memory(precision)
            n = mem[0]["n_params"] / 1e6
            for key, label, target in (("peak_growth_mib", "peak resident growth", "<= 0.6x"),
                                       ("rss_growth_mib", "resident growth at the end", "(info)"),
                                       ("model_state_mib", "model states at the end", "(info)")):
                z0, z3 = mem[0][key], mem[3][key]
                print(f"| ZeRO-3 vs ZeRO-0 {label} per rank, 2 ranks, {precision}, {n:.0f}M params (MiB) "
                      f"| {z3:,.0f} | {z0:,.0f} | {z3 / z0:.3f}x | {target} |")
    if torch.cuda.is_available():
        for backend, mfu in bench_gpu_mfu():
            print(f"| MFU llada_1b seq 4096 bf16, 1 GPU, {backend} | {mfu:.1%} | | | >= 45% |")
    else:
        print("| MFU llada_1b seq 4096 bf16 (needs a CUDA GPU) | not measured | | | >= 45% |")


if __name__ == "__main__":
    main()
