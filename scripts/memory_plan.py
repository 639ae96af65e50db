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
    mlp: int
    vocab: int

    @classmethod
    def from_yaml(cls, path: Path) -> Shape:
        c = yaml.safe_load(path.read_text())
        return cls(path.stem, c["d_model"], c["n_layers"], c["n_heads"], c["n_kv_heads"],
                   c["mlp_hidden_size"], c["vocab_size"])

    @property
    def params(self) -> int:
        """All parameters: the MFU count's non-embedding ones plus the embedding table."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append",
                    help="model preset yaml (default: conf/model/llada_1b.yaml and llada_8b.yaml)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunk-rows", type=int, default=1024, help="the loss path's chunk of rows")
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


if __name__ == "__main__":
    main()
