#!/usr/bin/env python3
"""Per-GPU memory of a training step, from the arithmetic (no GPU needed).

    python scripts/memory_plan.py                      # the README's table (1B and 8B, 8 GPUs)
    python scripts/memory_plan.py --model conf/model/llada_8b.yaml --gpus 64 --seq 4096

Estimates in GB (1e9 bytes), bf16 activations, +10% allocator slack. Model states:
16 bytes/param (bf16 param + grad, fp32 master, Adam m and v) split by the ZeRO stage.
Activations per sequence, per block (L tokens, d model width, F MLP width, kv = n_kv_heads x
head_dim), counted from what autograd saves:
  eager:    26 L d + 12 L kv + 8 L F bytes  (fp32 RMSNorm inputs and RoPE, bf16 SDPA, SwiGLU)
  compiled: 10 L d +  4 L kv + 6 L F bytes  (fused norm, RoPE and SwiGLU keep bf16 only)
  full checkpointing: 2 L d per block (its input) + one block's working set in backward.
Loss path: the old full-logits path holds bf16 logits + fp32 copy, log-softmax and grad for
every position (14 bytes x B L V); the masked-row chunked path holds one chunk of rows'
fp32 logits, softmax and grad (12 bytes x chunk x V). Measure before trusting: the real
figures come from benchmarks/gpu_bench.py.

Mixture-of-experts rows (``--moe``, LLaDA2.0-mini and LLaDA-MoE-7B-A1B): model states by
the total parameters, activations by the active ones (each token's top-k experts plus the
shared one, and its k sorted copies), and the communication per micro-step of ZeRO-3 (every
parameter all-gathered in forward and again in backward, gradients reduce-scattered: 6 bytes
per parameter) against expert parallelism (experts stay put; ZeRO on the rest, plus two
all-to-alls of k x d bf16 per token per MoE layer, forward and backward).

Post-training rows (``--post-train``, llada-dpo's VRPO): a micro-batch of B pairs runs
2 B n sequences (chosen and rejected, n = ``--elbo-samples`` ELBO draws each) through the
policy with gradients; the reference pass runs first without gradients and frees its
activations, so only its weights are added: ``objective.reference=frozen_copy`` is one bf16
copy of the whole model per rank at every ZeRO stage (loaded beside the engine, never
sharded), ``lora_base`` (peft=lora) is the policy with its adapters off, 0 bytes. Full
fine-tuning's policy: 16 bytes/param by ZeRO stage. LoRA's: the frozen bf16 base (2
bytes/param, sharded only by ZeRO-3, whose frozen head stays gathered on every rank) plus 16
bytes per adapter parameter (A: r x in, B: out x r for each conf/peft/lora.yaml target).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from llada_train.model.config import ModelConfig  # noqa: E402
from llada_train.train.metrics import non_embedding_parameters  # noqa: E402

GB = 1e9


@dataclass
class Shape:
    name: str
    d: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int  # the MLP width whose activations a block saves (MoE: active width, see moe_shape)
    vocab: int
    total_params: int = 0  # set for MoE shapes (the dense count is computed from the fields)

    @classmethod
    def from_yaml(cls, path: Path) -> Shape:
        c = yaml.safe_load(path.read_text())
        return cls(path.stem, c["d_model"], c["n_layers"], c["n_heads"], c["n_kv_heads"],
                   c["mlp_hidden_size"], c["vocab_size"])

    @property
    def params(self) -> int:
        """All parameters: the MFU count's non-embedding ones plus the embedding table."""
        if self.total_params:
            return self.total_params
        cfg = ModelConfig(d_model=self.d, n_layers=self.layers, n_heads=self.heads,
                          n_kv_heads=self.kv_heads, mlp_hidden_size=self.mlp,
                          vocab_size=self.vocab, mask_token_id=0, eos_token_id=0,
                          pad_token_id=0, bos_token_id=0)
        return non_embedding_parameters(cfg) + self.d * self.vocab


def model_states_gb(params: int, stage: int, gpus: int) -> float:
    """bf16 params (2) + bf16 grads (2) + fp32 master, m, v (12) bytes, split by ZeRO."""
    sharded = {0: 0, 1: 12, 2: 14, 3: 16}[stage]
    return params * ((16 - sharded) + sharded / gpus) / GB


def activations_gb(s: Shape, seq: int, micro: int, mode: str, compiled: bool) -> float:
    kv = s.kv_heads * (s.d // s.heads)
    per_block = (10 * s.d + 4 * kv + 6 * s.mlp) if compiled else (26 * s.d + 12 * kv + 8 * s.mlp)
    per_block *= seq
    # full checkpointing: block inputs + one block recomputed at a time in backward
    total = s.layers * per_block if mode == "none" else s.layers * 2 * s.d * seq + per_block
    return micro * total / GB


def loss_gb(s: Shape, seq: int, micro: int, chunk_rows: int | None) -> float:
    if chunk_rows is None:
        return 14 * micro * seq * s.vocab / GB
    return 12 * min(chunk_rows, micro * seq) * s.vocab / GB


def plan(s: Shape, stage: int, gpus: int, seq: int, micro: int, ckpt: str, compiled: bool,
         chunk_rows: int | None) -> float:
    total = (model_states_gb(s.params, stage, gpus) + activations_gb(s, seq, micro, ckpt, compiled)
             + loss_gb(s, seq, micro, chunk_rows))
    return 1.1 * total


def largest_micro_batch(s: Shape, stage: int, gpus: int, seq: int, ckpt: str, compiled: bool,
                        chunk_rows: int | None, capacity_gb: float) -> str:
    """The largest micro-batch of 1-16 under 95% of ``capacity_gb``, or '-' when none fits."""
    fits = [m for m in range(1, 17)
            if plan(s, stage, gpus, seq, m, ckpt, compiled, chunk_rows) < 0.95 * capacity_gb]
    return str(max(fits)) if fits else "-"


LORA_YAML = REPO / "conf/peft/lora.yaml"
HEAD = "model.transformer.ff_out"  # a LoRA target by full name (the output head)


def lora_targets() -> list[str]:
    """``peft.target_modules`` of conf/peft/lora.yaml (the block Linears by default)."""
    return yaml.safe_load(LORA_YAML.read_text())["target_modules"]


def lora_params(s: Shape, r: int, targets: list[str]) -> int:
    """LoRA parameters: r x (in + out) per targeted Linear, every block's (and the head's)."""
    hd = s.d // s.heads
    q, kv = s.heads * hd, s.kv_heads * hd
    block = {"q_proj": (s.d, q), "k_proj": (s.d, kv), "v_proj": (s.d, kv), "attn_out": (q, s.d),
             "ff_proj": (s.d, s.mlp), "up_proj": (s.d, s.mlp), "ff_out": (s.mlp, s.d)}
    unknown = [t for t in targets if t not in block and t != HEAD]
    if unknown:
        sys.exit(f"error: {LORA_YAML}: target {unknown[0]!r} has no shape here; use {list(block)}")
    per_block = sum(r * sum(block[t]) for t in targets if t in block)
    return s.layers * per_block + (r * (s.d + s.vocab) if HEAD in targets else 0)


def post_states_gb(s: Shape, stage: int, gpus: int, lora_r: int, reference: str) -> tuple[float, float]:
    """(policy's model states, reference weights) GB per GPU; ``lora_r`` 0 is full fine-tuning."""
    if lora_r:
        head = 2 * s.d * s.vocab  # frozen bf16 head: gathered once fetched under ZeRO-3 (lora.py)
        base = 2 * s.params / gpus + head * (1 - 1 / gpus) if stage == 3 else 2 * s.params
        policy = base / GB + model_states_gb(lora_params(s, lora_r, lora_targets()), stage, gpus)
    else:
        policy = model_states_gb(s.params, stage, gpus)
    return policy, (2 * s.params / GB if reference == "frozen_copy" else 0.0)


def post_plan(s: Shape, stage: int, gpus: int, seq: int, pairs: int, lora_r: int, reference: str,
              samples: int, chunk_rows: int) -> float:
    """GB per GPU of a VRPO step: compiled blocks, full checkpointing, chunked loss, +10%."""
    rows = 2 * pairs * samples  # sequences through the policy, with gradients
    policy, ref = post_states_gb(s, stage, gpus, lora_r, reference)
    acts = activations_gb(s, seq, rows, "full", True) + loss_gb(s, seq, rows, chunk_rows)
    return 1.1 * (policy + ref + acts)


def largest_pairs(s: Shape, stage: int, gpus: int, seq: int, lora_r: int, reference: str,
                  samples: int, chunk_rows: int, capacity_gb: float) -> str:
    """The largest micro-batch of 1-16 pairs under 95% of ``capacity_gb``, or '-'."""
    fits = [b for b in range(1, 17) if post_plan(s, stage, gpus, seq, b, lora_r, reference, samples,
                                                 chunk_rows) < 0.95 * capacity_gb]
    return str(max(fits)) if fits else "-"


def print_post_training(models: list[Path], gpus: int, seq: int, chunk_rows: int, lora_r: int,
                        samples: int) -> None:
    """The VRPO table: the reference's memory (frozen_copy vs lora_base), full and LoRA."""
    print(f"\nPost-training, VRPO (seq {seq}, {gpus} GPUs, {samples} ELBO samples per response, "
          "compiled blocks, full checkpointing, chunked loss; micro-batches count pairs). LoRA "
          f"r={lora_r} on {', '.join(lora_targets())} (conf/peft/lora.yaml):\n")
    print("| model | tuning | ZeRO | reference | policy states GB | reference GB | GB at 1 pair | "
          "H100 80 GB pairs | H200 141 GB pairs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in models:
        s = Shape.from_yaml(path)
        # lora_base needs adapters to switch off, so full fine-tuning has only the frozen copy
        rows = [(0, "full", "frozen_copy")]
        rows += [(lora_r, f"LoRA r={lora_r}", ref) for ref in ("frozen_copy", "lora_base")]
        for r, tuning, ref in rows:
            for stage in (1, 2, 3):
                policy, ref_gb = post_states_gb(s, stage, gpus, r, ref)
                gb = post_plan(s, stage, gpus, seq, 1, r, ref, samples, chunk_rows)
                fit = [largest_pairs(s, stage, gpus, seq, r, ref, samples, chunk_rows, c) for c in (80, 141)]
                print(f"| {s.name} ({s.params / 1e9:.2f}B) | {tuning} | {stage} | {ref} | {policy:.1f} | "
                      f"{ref_gb:.1f} | {gb:.0f} | {fit[0]} | {fit[1]} |")


# config.json values: LLaDA2.0-mini from dFactory's configs/model_configs/llada2_mini/config.json;
# LLaDA-MoE-7B-A1B from a secondary copy of its Hub config (check against the Hub's config.json)
MOE_MODELS: dict[str, dict] = {
    "LLaDA2.0-mini": dict(
        d_model=2048, n_layers=20, n_heads=16, n_kv_heads=4, mlp_hidden_size=5120,
        vocab_size=157184, qk_norm=True, partial_rotary_factor=0.5, num_experts=256,
        num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
    ),
    "LLaDA-MoE-7B-A1B": dict(
        d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden_size=8192,
        vocab_size=157184, qk_norm=True, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=1024, router="lladamoe",
    ),
}  # fmt: skip


def moe_config(name: str) -> ModelConfig:
    """The ModelConfig of a ``MOE_MODELS`` entry (token ids do not matter here)."""
    ids = dict(mask_token_id=0, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    return ModelConfig(**MOE_MODELS[name], **ids)


def moe_shape(name: str) -> Shape:
    """A Shape whose params are the total (all experts) and whose ``mlp`` is the mean over
    layers of the width a token's activations span: the dense MLP, or k experts + the shared
    one + the k sorted copies of the token (d each)."""
    cfg = moe_config(name)
    widths = [cfg.ffn_width(i) + (cfg.num_experts_per_tok * (cfg.moe_intermediate_size + cfg.d_model)
                                  if cfg.is_moe_layer(i) else 0) for i in range(cfg.n_layers)]
    biases = cfg.num_experts * sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    total = non_embedding_parameters(cfg) + cfg.d_model * cfg.vocab_size + biases
    return Shape(name, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                 round(sum(widths) / len(widths)), cfg.vocab_size, total_params=total)


def comm_gb_per_micro_step(name: str, gpus: int, tokens_per_gpu: int) -> tuple[float, float]:
    """GB each GPU sends+receives per micro-step: ZeRO-3 without expert parallelism, and
    expert parallelism over ``gpus`` (ZeRO-3 on the non-expert parameters only)."""
    cfg = moe_config(name)
    share = (gpus - 1) / gpus  # a ring all-gather / reduce-scatter moves this of the whole
    total = moe_shape(name).params
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    experts = moe_layers * cfg.num_experts * 3 * cfg.d_model * cfg.moe_intermediate_size
    zero3 = 6 * total * share  # all-gather fwd + all-gather bwd + reduce-scatter grads, bf16
    a2a = 2 * 2 * moe_layers * tokens_per_gpu * cfg.num_experts_per_tok * cfg.d_model * 2 * share
    return zero3 / GB, (6 * (total - experts) * share + a2a) / GB


def print_moe(gpus: int, seq: int, chunk_rows: int) -> None:
    """The mixture-of-experts table: parameters, per-GPU memory by ZeRO stage, communication."""
    print(f"\nMixture of experts (seq {seq}, {gpus} GPUs, compiled blocks + chunked loss, "
          "micro-batch 4 where GB is shown):\n")
    print("| model | total / active params | ZeRO | ckpt | GB at mb 4 | H100 80 GB mb | "
          "H200 141 GB mb | comm GB/micro-step: ZeRO-3 / expert-parallel |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in MOE_MODELS:
        s, cfg = moe_shape(name), moe_config(name)
        active = non_embedding_parameters(cfg, active=True) + cfg.d_model * cfg.vocab_size
        zero3, ep = comm_gb_per_micro_step(name, gpus, 4 * seq)
        for stage in (2, 3):
            for ckpt in ("none", "full"):
                gb = plan(s, stage, gpus, seq, 4, ckpt, True, chunk_rows)
                fit = [largest_micro_batch(s, stage, gpus, seq, ckpt, True, chunk_rows, c) for c in (80, 141)]
                comm = f"{zero3:.0f} / {ep:.0f}" if stage == 3 else "-"
                print(f"| {name} | {s.params / 1e9:.2f}B / {active / 1e9:.2f}B | {stage} | {ckpt} | "
                      f"{gb:.0f} | {fit[0]} | {fit[1]} | {comm} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append",
                    help="model preset yaml (default: conf/model/llada_1b.yaml and llada_8b.yaml)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunk-rows", type=int, default=1024, help="the loss path's chunk of rows")
    ap.add_argument("--moe", action="store_true", help="also the mixture-of-experts table")
    ap.add_argument("--post-train", action="store_true",
                    help="also the VRPO table: frozen_copy vs lora_base reference, full and LoRA")
    ap.add_argument("--lora-r", type=int, default=128, help="the post-training table's LoRA rank")
    ap.add_argument("--elbo-samples", type=int, default=8,
                    help="VRPO's ELBO samples per response (objective.elbo_timesteps x masks)")
    args = ap.parse_args()
    models = args.model or [REPO / "conf/model/llada_1b.yaml", REPO / "conf/model/llada_8b.yaml"]
    print(f"Seq {args.seq}, {args.gpus} GPUs, bf16. 'old' = eager blocks + full-logits loss; 'new' ="
          f" compiled blocks + masked-row loss in chunks of {args.chunk_rows} rows.")
    print("GB/GPU at micro-batch 4, and the largest micro-batch (of 1-16) that fits 95% of memory:\n")
    print("| model | ZeRO | checkpointing | GB at mb 4: old / new | H100 80 GB: old / new | H200 141 GB: old / new |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in models:
        s = Shape.from_yaml(path)
        for stage in (1, 2, 3):
            for ckpt in ("none", "full"):
                cells = []
                for cap in (None, 80, 141):
                    pair = []
                    for chunk, compiled in ((None, False), (args.chunk_rows, True)):
                        if cap is None:
                            gb = plan(s, stage, args.gpus, args.seq, 4, ckpt, compiled, chunk)
                            pair.append(f"{gb:.0f}")
                        else:
                            pair.append(largest_micro_batch(s, stage, args.gpus, args.seq, ckpt,
                                                            compiled, chunk, cap))
                    cells.append(" / ".join(pair))
                print(f"| {s.name} ({s.params / 1e9:.2f}B) | {stage} | {ckpt} | " + " | ".join(cells) + " |")
    if args.moe:
        print_moe(args.gpus, args.seq, args.chunk_rows)
    if args.post_train:
        print_post_training(models, args.gpus, args.seq, args.chunk_rows, args.lora_r, args.elbo_samples)


if __name__ == "__main__":
    main()
