"""One rank of train_bench's ZeRO memory rows: build, train 2 steps, report memory as JSON.

Launched by ``torchrun`` from train_bench.py with ZERO_STAGE, PRECISION and MEM_OUT set.
Reports, from after ``init_distributed`` on: resident growth at the end (after malloc_trim),
peak resident growth (the kernel's high-water mark, reset at the start) and model-state bytes.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bench import RandomTokens  # noqa: E402

from llada_train.config import LoggingConfig, OptimConfig, TrainerConfig  # noqa: E402
from llada_train.diffusion import ObjectiveConfig, PretrainObjective  # noqa: E402
from llada_train.model import ModelConfig  # noqa: E402
from llada_train.train.build import build_model  # noqa: E402
from llada_train.train.distributed import DeepSpeedConfig, init_distributed, render_deepspeed_config  # noqa: E402
from llada_train.train.loop import LoopConfigs, Trainer  # noqa: E402
from llada_train.train.parts import RunContext, TrainerParts  # noqa: E402
from llada_train.train.schedule import ScheduleConfig  # noqa: E402

MIB = 2**20
# ~113M parameters: big enough that fixed costs both stages pay only once (torch._dynamo imported
# by the optimizer, ~70 MiB; DeepSpeed's ZeRO path importing torch.compile, ~45 MiB) do not
# dominate the ratio, small enough for two ZeRO-0 fp32 ranks (~2.6 GiB each) on a CI machine
MODEL = ModelConfig(d_model=768, n_layers=16, n_heads=12, n_kv_heads=12, mlp_hidden_size=2048, vocab_size=512)


def trimmed_rss(proc: psutil.Process) -> int:
    """Resident set after glibc hands freed heap pages back (so RSS means live memory)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return proc.memory_info().rss


def reset_peak_rss() -> None:
    """Restart the kernel's resident high-water mark (VmHWM) from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model_state_bytes(trainer: Trainer) -> int:
    """Bytes of this rank's parameters, gradients and optimizer states, each storage once."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if t is not None and t.numel():  # views (ZeRO's flat buffers) count their whole storage once
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for p in trainer.engine.module.parameters():
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p)
        add(p.grad)
    opt = trainer.engine.optimizer
    # ZeRO-3 keeps its fp32 master partitions and the gradient partition buffer between steps
    # (outside the torch optimizer's param_groups, which it empties after each step)
    for t in getattr(opt, "fp32_partitioned_groups_flat", []):
        add(t)
    add(getattr(opt, "grad_partitions_flat_buffer", None))
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:  # fp32 master weights of the bf16 ZeRO-0 wrapper live here
        for p in group["params"]:
            add(p)
            add(p.grad)
    for state in inner.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                add(t)
    return sum(seen.values())


def main() -> None:
    stage = int(os.environ["ZERO_STAGE"])
    bf16 = os.environ.get("PRECISION", "fp32") == "bf16"
    info = init_distributed()
    proc = psutil.Process()
    rss0 = trimmed_rss(proc)
    reset_peak_rss()
    cfg = MODEL
    # ZeRO-3 knobs sized for a ~100M model (DeepSpeed's defaults are sized for billions): 2M-element
    # buckets and optimizer sub-groups bound the transient copies; at most ~1.5 layers gathered,
    # and a gathered layer is kept only when it is used again within 2M elements
    ds = DeepSpeedConfig(zero_stage=stage, reduce_bucket_size=2_000_000, stage3_prefetch_bucket_size=2_000_000,
                         stage3_max_live_parameters=10_000_000, stage3_max_reuse_distance=2_000_000,
                         sub_group_size=2_000_000)
    tcfg = TrainerConfig(max_steps=10**9, global_batch_size=2, micro_batch_size=1, seq_len=32,
                         precision="bf16" if bf16 else "fp32")
    ds_json = render_deepspeed_config(ds, 2, 1, info.world_size, 1.0, bf16)
    model = build_model(cfg, stage, ds_json, seed=0, init_from=None)
    trainer = Trainer(
        TrainerParts(model=model, model_cfg=cfg,
                     objective=PretrainObjective(ObjectiveConfig(var_len_prob=0.0), cfg.mask_token_id),
                     reader=RandomTokens(1, 32, cfg.vocab_size, info.rank), dist=info),
        LoopConfigs(trainer=tcfg, optim=OptimConfig(),
                    schedule=ScheduleConfig(name="constant", peak_lr=1e-4, warmup_steps=1),
                    logging=LoggingConfig(progress_bar=False)),
        ds_json,  # the dict the model was built with: rendered once
        RunContext(Path(tempfile.mkdtemp()), seed=0),
    )
    for _ in range(2):
        trainer.train_step()
    # growth from after init_distributed: imports and the process group cost the same for both
    row = {
        "peak_growth_mib": (peak_rss() - rss0) / MIB,
        "rss_growth_mib": (trimmed_rss(proc) - rss0) / MIB,
        "model_state_mib": model_state_bytes(trainer) / MIB,
        "n_params": trainer.n_params,
    }
    Path(os.environ["MEM_OUT"], f"rank{info.rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
