"""One-GPU training-step benchmark with torch alone (no DeepSpeed, Hydra or OmegaConf).

    python benchmarks/gpu_bench.py --out runs/gpu_bench [--budget-s 420] [--peak-tflops 989]
    python benchmarks/gpu_bench.py --smoke --out /tmp/gpu_bench   # tiny shapes, CPU, seconds

Rows (each a fresh model, measured in this one run): ``llada_1b`` at micro-batch 4 x 4096 and
a 4-layer slice of ``llada_8b`` at 4 x 4096; the old full-logits loss vs the masked-row
chunked loss; eager vs each block compiled (``nn.Module.compile``); SDPA backends forced
with ``sdpa_kernel``; MLP width 5634 vs 5632 vs 5696. Mode: bf16 parameters, forward +
backward + a fused AdamW step on the bf16 parameters (no fp32 master copy). Reported:
tokens/s, MFU (``flops_per_token``: 6 x non-embedding params + 12 x layers x d x L, over
``--peak-tflops``), peak memory, first-step time (includes compilation), loss of step 1.
That formula counts the head at every position; the masked-row loss runs it on the masked
rows only (about half, plus a recompute of its forward), so for the new loss path it
overstates the FLOPs done: by up to ~8% for llada_1b and ~17% for the 8B 4-layer slice,
where the head is a third of the FLOPs.

Block-diffusion rows (objective=block, block 32, BD3-LM defaults): the input is cat(x_t, x_0),
2 x 4096 positions per sequence, with the block-diffusion mask as a dense SDPA boolean mask
or as a flex_attention BlockMask (``attention_backend=flex``). tokens/s counts data tokens (the
4096 of each row, as the other rows), and their MFU uses honest FLOPs for the 2L input
(``block_flops_per_token``): the body's matmuls twice per data token, the head once, and only
the attention scores the mask allows ((n + 1) / 4n of the 2L x 2L grid for n blocks: about
the 1L pass's own count); the dense mask computes all 4x of them, flex skips masked tiles.

Mixture-of-experts rows (``mini4``): the first 4 layers of LLaDA2.0-mini (dFactory's
llada2_mini config.json, the numbers of scripts/memory_plan.py: d 2048, 16 heads / 4 kv heads
of 128, q/k RMSNorm, RoPE on half of each head, vocab 157184; layer 0 a dense 5120 MLP, layers
1-3 a sigmoid group-limited router over 256 experts of 512 in 8 groups, top-4 groups, top-8
experts, scale 2.5, plus one shared expert of 512) at micro-batch 4 x 4096, the routed
experts run by ``moe_impl=grouped_mm`` (``torch._grouped_mm``: CUDA bf16 on compute
capability 9.0+) and by ``moe_impl=loop`` (one matmul triple per expert). Each step also
moves the expert bias (``update_expert_bias``, rate 1e-3), as the training loop does. Their
MFU counts ACTIVE FLOPs: ``flops_per_token`` takes a MoE layer's shared expert, router and
top-8 experts (``non_embedding_parameters(active=True)``: 482M of 2.82B non-embedding
parameters), not all 256 experts, and not the routing (sort, gather, scatter). The head is
~59% of those FLOPs, so the masked-row loss's overstatement above is ~24% here. Smoke:
d_model 64, 8 experts of 16 (top-2, 2 groups, top-1 group), shared expert 16, dense MLP 160.

Every row runs in try/except (an OOM or an unsupported backend is recorded as
``error: ...``), the JSON and markdown tables are rewritten as each row completes, and rows
past ``--budget-s`` are recorded as skipped. ``--smoke`` runs the same code in fp32 on CPU
at tiny shapes (compile with ``aot_eager``); CPU rows show no MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llada_train.diffusion import ObjectiveConfig, PretrainObjective  # noqa: E402
from llada_train.diffusion.block import BlockObjective  # noqa: E402
from llada_train.model import LLaDAModel, ModelConfig  # noqa: E402
from llada_train.model.moe import expert_metrics, update_expert_bias  # noqa: E402
from llada_train.train.metrics import flops_per_token  # noqa: E402


@dataclasses.dataclass
class Case:
    """One row: which model, loss path and kernels."""

    name: str
    model: str  # "1b", "8b4" or "mini4" (smoke: tiny stand-ins of each)
    loss: str = "new"  # "old": full logits + fp32 CE over (B, L, V); "new": masked rows, chunked
    compiled: bool = False
    sdpa: str = "default"  # "default", "flash", "cudnn", "efficient"
    mlp: int | None = None  # MLP width override
    chunk: int | None = None  # loss_chunk_rows override
    block: int = 0  # > 0: objective=block with this block size (the 2L input)
    backend: str = "sdpa"  # attention_backend: "flex" runs block masks as a flex BlockMask
    moe_impl: str | None = None  # routed-expert kernel of a MoE model: "grouped_mm" or "loop"


CASES = [
    Case("1b new eager", "1b"),
    Case("1b old-loss eager", "1b", loss="old"),
    Case("1b new compiled", "1b", compiled=True),
    Case("8b4 new eager", "8b4"),
    Case("8b4 new compiled", "8b4", compiled=True),
    Case("8b4 old-loss eager", "8b4", loss="old"),
    Case("1b new eager sdpa=flash", "1b", sdpa="flash"),
    Case("1b new eager sdpa=cudnn", "1b", sdpa="cudnn"),
    Case("1b new eager sdpa=efficient", "1b", sdpa="efficient"),
    Case("1b new eager mlp=5632", "1b", mlp=5632),
    Case("1b new eager mlp=5696", "1b", mlp=5696),
    Case("1b new compiled mlp=5696", "1b", compiled=True, mlp=5696),
    Case("1b new eager chunk=4096", "1b", chunk=4096),
    Case("1b block32 dense-mask eager", "1b", block=32),
    Case("1b block32 flex eager", "1b", block=32, backend="flex"),
    Case("mini4 moe=grouped_mm eager", "mini4", moe_impl="grouped_mm"),
    Case("mini4 moe=loop eager", "mini4", moe_impl="loop"),
]
SMOKE_BLOCK = 8  # smoke stand-in of block 32 (sequence 64)
SMOKE_MLP = {5632: 128, 5696: 192}  # smoke stand-ins of the padded widths (tiny base is 130)
# LLaDA2.0-mini's first 4 layers (dFactory configs/model_configs/llada2_mini/config.json, as in
# scripts/memory_plan.py MOE_MODELS; mask id as in tests/test_moe.py): layer 0 dense, 1-3 MoE
LLADA2_MINI_4 = dict(
    d_model=2048, n_layers=4, n_heads=16, n_kv_heads=4, mlp_hidden_size=5120, vocab_size=157184,
    qk_norm=True, partial_rotary_factor=0.5, num_experts=256, num_experts_per_tok=8,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, first_k_dense_replace=1,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, mask_token_id=156895,
    max_sequence_length=4096,
)  # fmt: skip
# its smoke stand-in: the same structure at d_model 64 (widths in the same ratios to d_model)
SMOKE_MINI_4 = dict(
    d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=160, vocab_size=1000,
    qk_norm=True, partial_rotary_factor=0.5, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, first_k_dense_replace=1,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, mask_token_id=3, max_sequence_length=64,
)  # fmt: skip
MOE_BIAS_UPDATE_RATE = 1e-3  # conf/model/tiny_moe_llada2.yaml's router_bias_update_rate


def read_preset(name: str) -> dict:
    """A flat ``key: value`` preset from conf/model (no YAML library needed)."""
    out: dict = {}
    for line in (REPO / "conf" / "model" / f"{name}.yaml").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        out[key] = float(value) if any(c in value for c in ".e") else int(value)
    return out


def model_config(case: Case, smoke: bool) -> ModelConfig:
    """The row's ModelConfig: a preset (or its tiny smoke stand-in) with the row's overrides."""
    if case.model == "mini4":
        raw = dict(
            SMOKE_MINI_4 if smoke else LLADA2_MINI_4,
            moe_impl=case.moe_impl or "auto",
            router_bias_update_rate=MOE_BIAS_UPDATE_RATE,
        )
    elif smoke:
        layers, kv = (2, 2) if case.model == "1b" else (4, 4)
        raw = dict(
            d_model=64, n_layers=layers, n_heads=4, n_kv_heads=kv, mlp_hidden_size=130,
            vocab_size=1000, max_sequence_length=64, mask_token_id=3,
        )  # fmt: skip
    else:
        raw = read_preset("llada_1b" if case.model == "1b" else "llada_8b")
        if case.model == "8b4":
            raw["n_layers"] = 4
    if case.mlp is not None:
        raw["mlp_hidden_size"] = SMOKE_MLP[case.mlp] if smoke else case.mlp
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if "compile" in known:
        raw["compile"] = False  # this bench compiles blocks itself, per row
    raw["attention_backend"] = case.backend
    return ModelConfig(**raw)


def block_flops_per_token(cfg: ModelConfig, seq_len: int, block: int) -> float:
    """Training FLOPs per data token of a block-diffusion step (``flops_per_token``'s
    convention): the body runs on 2L positions (x2), the head on the x_t half (x1), and
    attention counts the scores the 2L mask allows: a noisy query in block b sees B + bB keys,
    a clean one (b + 1)B, so L (n + 1) B per sequence, n = L / B blocks."""
    head = cfg.d_model * cfg.vocab_size
    body = flops_per_token(cfg, 0) - 6.0 * head  # 6 x non-embedding body parameters
    n = seq_len // block
    allowed = seq_len * (n + 1) * block  # allowed (query, key) pairs per sequence
    return 2.0 * body + 6.0 * head + 12.0 * cfg.n_layers * cfg.d_model * allowed / seq_len


def full_logits_loss(model, objective: PretrainObjective, batch, generator) -> torch.Tensor:
    """The loss path before the masked-row head: logits and fp32 CE at every position."""
    x0, noisy, masked, w = objective.draw(batch, generator)  # the same draws as the objective
    logits = model(noisy)  # (B, L, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, L)
    return (ce * masked * w[:, None]).sum()


def sdpa_context(name: str):
    from contextlib import nullcontext

    if name == "default":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": "FLASH_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
    }
    return sdpa_kernel(getattr(SDPBackend, backend[name]))


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LLaDAModel:
    """Built on the device with a seeded normal init there (the CPU init is slow at 1B+)."""
    torch.manual_seed(0)
    with device:
        model = LLaDAModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                continue  # the MoE expert bias: zeros and fp32, as the model keeps it
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.init_std)
            p.data = p.data.to(dtype)  # parameters only: fp32 buffers (RoPE tables) stay fp32
    return model


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = model_config(case, args.smoke)
    batch_size, seq_len = (2, 64) if args.smoke else (4, 4096)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    obj_cfg = ObjectiveConfig(var_len_prob=0.0)
    if case.chunk is not None:
        obj_cfg.loss_chunk_rows = case.chunk
    bsize = (SMOKE_BLOCK if args.smoke else case.block) if case.block else 0
    if bsize:
        obj_cfg = dataclasses.replace(obj_cfg, name="block", block_size=bsize)
        objective = BlockObjective(obj_cfg, cfg.mask_token_id)
    else:
        objective = PretrainObjective(obj_cfg, cfg.mask_token_id)
    model = build_model(cfg, device, dtype)
    if case.compiled:
        for block in model.transformer.blocks:
            block.compile(backend="aot_eager" if args.smoke else "inductor")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(4, cfg.vocab_size, (batch_size, seq_len), generator=gen, device=device)
    batch = {"input_ids": data}

    def step() -> torch.Tensor:
        if case.loss == "old":
            loss = full_logits_loss(model, objective, batch, gen)
        else:
            loss = objective(model, batch, gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model)  # the training loop's post-step balancing (dense: nothing)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    row: dict = {
        "chunk_rows": obj_cfg.loss_chunk_rows,
        "mlp": cfg.mlp_hidden_size,
        "layers": cfg.n_layers,
        "block": bsize or None,
        "moe_impl": case.moe_impl,
    }
    with sdpa_context(case.sdpa):
        sync()
        t0 = time.perf_counter()
        first_loss = step()
        sync()
        row["first_step_s"] = time.perf_counter() - t0
        row["loss_step1"] = float(first_loss)
        step()  # one more warm-up (allocator, autotuning)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        dt = (time.perf_counter() - t0) / args.steps
    tok_s = batch_size * seq_len / dt
    fpt = block_flops_per_token(cfg, seq_len, bsize) if bsize else flops_per_token(cfg, seq_len)
    row.update(step_s=dt, tokens_per_s=tok_s, flops_per_token=fpt)
    loads = [v for k, v in expert_metrics(model).items() if k.endswith("load_max_mean")]
    if loads:  # routing balance of the last step (max over layers): the loop kernel's worst run
        row["expert_load_max_mean"] = max(loads)
    if device.type == "cuda":
        row["mfu"] = tok_s * row["flops_per_token"] / (args.peak_tflops * 1e12)
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


COLUMNS = [
    ("name", "row"), ("status", "status"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
    ("peak_mem_gib", "peak GiB"), ("first_step_s", "first step s"), ("step_s", "step s"),
    ("loss_step1", "loss @1"), ("mlp", "MLP"), ("chunk_rows", "chunk rows"), ("block", "block"),
    ("moe_impl", "MoE"),
]  # fmt: skip


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key == "mfu":
        return f"{v:.1%}"
    if key == "tokens_per_s":
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_tables(out: Path, meta: dict, rows: list[dict]) -> None:
    """Rewrite gpu_bench.json and gpu_bench.md (via a temporary file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# gpu_bench ({meta['device']}, {meta['mode']})",
        "",
        "MFU = tokens/s x flops_per_token / peak; flops_per_token counts the head at every "
        "position, the new loss path runs it on masked rows only (see the module docstring); "
        "MoE rows count active parameters (shared expert, router, top-k experts).",
        "",
    ]
    lines += ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |")
    base = {r["name"]: r for r in rows if r.get("status") == "ok"}
    ratios = [
        ("1b new eager", "1b old-loss eager"), ("8b4 new eager", "8b4 old-loss eager"),
        ("1b new compiled", "1b new eager"), ("8b4 new compiled", "8b4 new eager"),
        ("1b block32 dense-mask eager", "1b new eager"), ("1b block32 flex eager", "1b new eager"),
        ("1b block32 flex eager", "1b block32 dense-mask eager"),
        ("mini4 moe=grouped_mm eager", "mini4 moe=loop eager"),
    ]  # fmt: skip
    lines += ["", "| ratio | tokens/s | peak memory |", "| --- | --- | --- |"]
    for a, b in ratios:
        if a in base and b in base:
            mem = (
                f"{base[a]['peak_mem_gib'] / base[b]['peak_mem_gib']:.3f}x"
                if "peak_mem_gib" in base[a]
                else "-"
            )
            lines.append(
                f"| {a} / {b} | {base[a]['tokens_per_s'] / base[b]['tokens_per_s']:.3f}x | {mem} |"
            )
    for name, text in (
        ("gpu_bench.json", json.dumps({"meta": meta, "rows": rows}, indent=1)),
        ("gpu_bench.md", "\n".join(lines) + "\n"),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json / .md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU")
    parser.add_argument("--budget-s", type=float, default=360.0, help="rows after this are skipped")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU")
    parser.add_argument("--only", default="", help="comma-separated row names to run")
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.smoke else 5)
    # The bench must run on a bare GPU image that has torch but none of these.
    heavy = {"deepspeed", "hydra", "omegaconf"} & set(sys.modules)
    if heavy:
        raise SystemExit(f"gpu_bench imported {sorted(heavy)}: it must run with torch alone")
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        raise SystemExit("gpu_bench needs a CUDA GPU (or --smoke)")
    cases = [c for c in CASES if not args.only or c.name in args.only.split(",")]
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "mode": "fp32 smoke, 2 x 64"
        if args.smoke
        else "bf16 params, fwd + bwd + fused AdamW (no fp32 master), micro-batch 4 x 4096",
        "torch": torch.__version__,
        "peak_tflops": args.peak_tflops,
        "planned": [c.name for c in cases],
    }
    rows: list[dict] = []
    t_start = time.perf_counter()
    for case in cases:
        row: dict = {"name": case.name}
        if time.perf_counter() - t_start > args.budget_s:
            row["status"] = "skipped: time budget"
        else:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                row.update(run_case(case, args, device))
                row["status"] = "ok"
            except Exception as e:  # an OOM or an unsupported kernel ends this row only
                row["status"] = (
                    f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                )
                traceback.print_exc()
            finally:
                gc.collect()
                if case.compiled:
                    torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        write_tables(args.out, meta, rows)
        print(
            f"{case.name}: " + ", ".join(f"{k}={_fmt(k, row.get(k))}" for k, _ in COLUMNS[1:]),
            flush=True,
        )
    print((args.out / "gpu_bench.md").read_text())


if __name__ == "__main__":
    main()
