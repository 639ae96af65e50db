"""LLaDA 2.x (``LLaDA2MoeModelLM``: LLaDA2.0-mini/-flash, LLaDA 2.1) <-> our released layout.

The released checkpoints fuse attention into ``attention.query_key_value`` (rows: all q heads,
then k, then v) and store one tensor per routed expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``); dFactory's training layout stacks them
(``mlp.experts.{gate,up,down}_proj``, (E, d_ff, d) and (E, d, d_ff), as ours). Both load;
``from_ours`` writes the per-expert layout unless ``per_expert=False``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from llada_train.errors import LladaError
from llada_train.model.adapters.base import StateDictAdapter, common_config
from llada_train.model.config import ModelConfig

LAYER = "model.layers.{}."
EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
STACKED = re.compile(r"^(.*\.moe)\.(gate|up|down)_proj$")


def config_read(cfg: ModelConfig | None, source: str) -> ModelConfig:
    """A MoE adapter's config, which its weight mapping needs (expert count, head sizes)."""
    if cfg is None:
        raise LladaError(f"{source}: read config.json (model_config) before the weights")
    return cfg


def stack_experts(
    hf: dict[str, torch.Tensor], num_experts: int, source: str
) -> dict[str, torch.Tensor]:
    """Per-expert tensors ``....experts.{e}.X_proj.weight`` -> stacked ``....experts.X_proj``
    (E, ...); other tensors pass. Refuses expert sets that do not match ``num_experts``."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in hf.items():
        m = EXPERT.match(name)
        if m is None:
            out[name] = tensor
            continue
        groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = tensor
    for (prefix, proj), per in groups.items():
        if sorted(per) != list(range(num_experts)):
            raise LladaError(
                f"{source}: {prefix}.*.{proj}_proj holds {len(per)} experts (ids {min(per)}.."
                f"{max(per)}) but config.json says num_experts={num_experts}; the expert tensors "
                "do not match the config: use the checkpoint's own config.json"
            )
        shapes = {tuple(t.shape) for t in per.values()}
        if len(shapes) != 1:
            raise LladaError(
                f"{source}: {prefix}.*.{proj}_proj experts differ in shape {sorted(shapes)}"
            )
        out[f"{prefix}.{proj}_proj"] = torch.stack([per[e] for e in range(num_experts)])
    return out


def unstack_experts(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``stack_experts``: stacked ``experts.X_proj`` -> one tensor per expert."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        m = re.match(r"^(.*\.experts)\.(gate|up|down)_proj$", name)
        if m is None:
            out[name] = tensor
            continue
        for e in range(tensor.shape[0]):
            out[f"{m.group(1)}.{e}.{m.group(2)}_proj.weight"] = tensor[e].clone()
    return out


def check_moe_experts(ours: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Stacked expert tensors (our names) against the config's expert count and widths."""
    e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_intermediate_size
    want = {"gate": (e, f, d), "up": (e, f, d), "down": (e, d, f)}
    for name, tensor in ours.items():
        m = STACKED.match(name)
        if m and tuple(tensor.shape) != want[m.group(2)]:
            raise LladaError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{want[m.group(2)]} (num_experts, moe_intermediate_size, hidden_size): the expert "
                "tensors do not match the config"
            )


class LLaDA2MoeAdapter(StateDictAdapter):
    """LLaDA 2.x names; q/k/v unfused, experts stacked, the shared expert as the block's MLP."""

    family = "llada2_moe"
    # LLaDA 2.0 and 2.1 (same block; dllm names 2.1 "llada21_moe"), dFactory training layout
    model_types = ("llada2_moe", "llada21_moe", "llada2_moe_veomni")
    name_map = {
        "model.word_embeddings.weight": "wte.weight",
        "model.norm.weight": "ln_f.weight",
        "lm_head.weight": "ff_out.weight",
        LAYER + "input_layernorm.weight": "blocks.{}.attn_norm.weight",
        # q/k/v: query_key_value split by ``to_ours`` into these (not in any checkpoint)
        LAYER + "attention.q_proj.weight": "blocks.{}.q_proj.weight",
        LAYER + "attention.k_proj.weight": "blocks.{}.k_proj.weight",
        LAYER + "attention.v_proj.weight": "blocks.{}.v_proj.weight",
        LAYER + "attention.q_proj.bias": "blocks.{}.q_proj.bias",
        LAYER + "attention.k_proj.bias": "blocks.{}.k_proj.bias",
        LAYER + "attention.v_proj.bias": "blocks.{}.v_proj.bias",
        LAYER + "attention.query_layernorm.weight": "blocks.{}.q_norm.weight",
        LAYER + "attention.key_layernorm.weight": "blocks.{}.k_norm.weight",
        LAYER + "attention.dense.weight": "blocks.{}.attn_out.weight",
        LAYER + "post_attention_layernorm.weight": "blocks.{}.ff_norm.weight",
        # dense layers first: from_ours renames MoE layers' ff_* to shared_experts afterwards
        LAYER + "mlp.gate_proj.weight": "blocks.{}.ff_proj.weight",
        LAYER + "mlp.up_proj.weight": "blocks.{}.up_proj.weight",
        LAYER + "mlp.down_proj.weight": "blocks.{}.ff_out.weight",
        LAYER + "mlp.shared_experts.gate_proj.weight": "blocks.{}.ff_proj.weight",
        LAYER + "mlp.shared_experts.up_proj.weight": "blocks.{}.up_proj.weight",
        LAYER + "mlp.shared_experts.down_proj.weight": "blocks.{}.ff_out.weight",
        LAYER + "mlp.gate.weight": "blocks.{}.moe.router.weight",
        LAYER + "mlp.gate.expert_bias": "blocks.{}.moe.router.expert_bias",
        LAYER + "mlp.experts.gate_proj": "blocks.{}.moe.gate_proj",
        LAYER + "mlp.experts.up_proj": "blocks.{}.moe.up_proj",
        LAYER + "mlp.experts.down_proj": "blocks.{}.moe.down_proj",
    }
    qkv = "attention.query_key_value"
    qkv_split = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    shared = "mlp.shared_experts."

    def __init__(self, source: str = "checkpoint", per_expert: bool = True) -> None:
        super().__init__(source)
        self.per_expert = per_expert
        self.cfg: ModelConfig | None = None  # set by model_config(); to_ours needs the shapes

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """LLaDA2's config.json; refuses biases beyond q/k/v and sliding windows."""
        for key, why in (("use_bias", "a bias on the attention output"),
                         ("use_sliding_window", "sliding-window attention")):  # fmt: skip
            if hf.get(key, key == "use_bias"):  # the released class defaults use_bias to true
                raise LladaError(
                    f"{self.source}: {key}=true ({why}) is not supported; LLaDA2.0 ships false"
                )
        experts = int(hf.get("num_experts") or 0)
        shared = int(hf.get("num_shared_experts") or 0)
        moe_width = int(hf.get("moe_intermediate_size") or 0)
        base = {k: v for k, v in hf.items() if k != "partial_rotary_factor"}
        cfg = common_config(base, self.source, include_qkv_bias=bool(hf.get("use_qkv_bias")))
        self.cfg = dataclasses.replace(
            cfg,
            qk_norm=bool(hf.get("use_qk_norm", True)),
            partial_rotary_factor=float(hf.get("partial_rotary_factor", 0.5)),
            num_experts=experts,
            num_experts_per_tok=int(hf.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=moe_width if experts else 0,
            shared_expert_intermediate_size=moe_width * shared if experts else 0,
            first_k_dense_replace=int(hf.get("first_k_dense_replace") or 0),
            router="llada2",
            n_group=int(hf.get("n_group") or 1) if experts else 1,
            topk_group=int(hf.get("topk_group") or 1) if experts else 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        )
        return self.cfg

    def to_ours(self, hf: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
        """Our state dict: q/k/v split from the fused rows, experts stacked, checked."""
        cfg = config_read(self.cfg, self.source)
        hf = stack_experts(hf, cfg.num_experts, self.source) if cfg.num_experts else dict(hf)
        sizes = [n * cfg.head_dim for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)]
        for name in [n for n in hf if f".{self.qkv}." in n]:
            fused = hf.pop(name)
            if fused.shape[0] != sum(sizes):
                raise LladaError(
                    f"{self.source}: {name} has {fused.shape[0]} rows but config.json implies "
                    f"{sum(sizes)} (heads {cfg.n_heads} + 2 x kv heads {cfg.n_kv_heads}, x head_dim "
                    f"{cfg.head_dim}); the checkpoint does not match its config"
                )
            for part, rows in zip(self.qkv_split, fused.split(sizes), strict=True):
                hf[name.replace(self.qkv, part)] = rows
        ours = super().to_ours(hf, tied)
        check_moe_experts(ours, cfg, self.source)
        return ours

    def from_ours(self, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The released layout: fused q/k/v, shared experts named as such, per-expert tensors
        (``per_expert``) or dFactory's stacked ones."""
        cfg = config_read(self.cfg, self.source)
        hf = super().from_ours(ours)
        for i in range(cfg.n_layers):
            prefix = LAYER.format(i)
            if cfg.is_moe_layer(i):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    name = f"{prefix}mlp.{proj}.weight"
                    if name in hf:
                        hf[f"{prefix}{self.shared}{proj}.weight"] = hf.pop(name)
            for kind in ("weight", "bias"):
                parts = [f"{prefix}{p}.{kind}" for p in self.qkv_split]
                if all(p in hf for p in parts):
                    hf[f"{prefix}{self.qkv}.{kind}"] = torch.cat([hf.pop(p) for p in parts])
        return unstack_experts(hf) if self.per_expert else hf
