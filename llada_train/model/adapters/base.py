"""A state-dict adapter: names of one model family <-> our released-layout names.

torchtitan's pattern: one class per family holds a name map with ``{}`` standing for the
layer index, and converts whole state dicts in both directions (``to_ours``, ``from_ours``).
The family's ``config.json`` becomes a ``ModelConfig`` through the same class, which refuses
what our block cannot compute (one line naming the field, the file and the fix).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

OURS = "model.transformer."  # the released checkpoint's prefix


class StateDictAdapter:
    """Name map between a Hugging Face family's checkpoint and ours (both with layer ``{}``)."""

    family = "base"
    model_types: tuple[str, ...] = ()
    # HF name -> our name (without the ``model.transformer.`` prefix); ``{}`` = layer index
    name_map: dict[str, str] = {}
    # HF tensors that carry no weights (old checkpoints saved RoPE's inverse frequencies)
    ignored = (r"(^|\.)rotary_emb\.inv_freq$",)

    def __init__(self, source: str = "checkpoint") -> None:
        self.source = source  # named in errors
        self._to_ours = [(self._pattern(h), o) for h, o in self.name_map.items()]
        self._from_ours = [(self._pattern(OURS + o), h) for h, o in self.name_map.items()]

    @staticmethod
    def _pattern(template: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")

    @staticmethod
    def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, target in table:
            m = pattern.match(name)
            if m:
                return target.format(*m.groups())
        return None

    def to_ours(self, hf: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
        """Our state dict from the family's; a tied head is duplicated into ``ff_out``."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in hf.items():
            if any(re.search(p, name) for p in self.ignored):
                continue
            if tied and name == "lm_head.weight":
                continue  # the embedding is the head: copied below
            ours = self._rename(name, self._to_ours)
            if ours is None:
                raise LladaError(
                    f"{self.source}: tensor {name!r} has no counterpart in our {self.family} "
                    "mapping (an unsupported feature of this checkpoint); nothing was written"
                )
            out[OURS + ours] = tensor
        if tied and OURS + "wte.weight" in out:
            # our layout is untied: the head starts as its own copy of the embedding
            out[OURS + "ff_out.weight"] = out[OURS + "wte.weight"].clone()
        return out

    def from_ours(self, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The family's state dict (untied, ``lm_head.weight`` included) from ours."""
        out = {}
        for name, tensor in ours.items():
            hf = self._rename(name, self._from_ours)
            if hf is None:
                raise LladaError(f"{self.source}: {name!r} has no {self.family} counterpart")
            out[hf] = tensor
        return out

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """Our ``ModelConfig`` for the family's ``config.json`` (before any mask token)."""
        raise NotImplementedError


def rope_theta(hf: dict[str, Any], source: str) -> float:
    """RoPE base of an HF config (transformers 4.x ``rope_theta``/``rope_scaling`` or 5.x
    ``rope_parameters``); refuses scaled RoPE, which our rotary table does not implement."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for block in (params, scaling):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in (None, "default"):
            raise LladaError(
                f"{source}: rope type {kind!r} is not implemented (only plain RoPE); "
                "convert a checkpoint without rope scaling"
            )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def first_id(value: Any) -> int | None:
    """A token id from a config field that may be a list (Llama 3 lists several EOS ids)."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def common_config(hf: dict[str, Any], source: str, **extra: Any) -> ModelConfig:
    """The fields every LLaMA-like family shares; checks the head width and activation."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LladaError(f"{source}: hidden_act={act!r}; our MLP is SwiGLU (silu) only")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d:
        raise LladaError(
            f"{source}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={d}; "
            "our attention needs head_dim = hidden_size / heads"
        )
    eos = first_id(hf.get("eos_token_id"))
    bos = first_id(hf.get("bos_token_id"))
    pad = first_id(hf.get("pad_token_id"))
    eos = eos if eos is not None else (bos if bos is not None else 0)
    return ModelConfig(
        d_model=d,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        mlp_hidden_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        rope_theta=rope_theta(hf, source),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_sequence_length=int(hf.get("max_position_embeddings", 2048)),
        init_std=float(hf.get("initializer_range", 0.02)),
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
        bos_token_id=bos if bos is not None else eos,
        mask_token_id=eos,  # placeholder: the converter sets the real mask id
        **extra,
    )
