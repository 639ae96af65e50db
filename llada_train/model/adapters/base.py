"""A state-dict adapter: names of one model family <-> our released-layout names.

torchtitan's pattern: one class per family holds a name map with ``{}`` standing for the
layer index, and converts whole state dicts in both directions (``to_ours``, ``from_ours``).
The family's ``config.json`` becomes a ``ModelConfig`` through the same class, which refuses
what our block cannot compute (one line naming the field, the file and the fix).
"""

from __future__ import annotations

import math
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


def rope_settings(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any]]:
    """RoPE base and scaling of an HF config (transformers 4.x ``rope_theta``/``rope_scaling``
    or 5.x ``rope_parameters``): the scaling as ``ModelConfig.rope_scaling_params`` with every
    default transformers would fill in made explicit, or {} for plain RoPE. Refuses what
    the rotary table cannot compute exactly."""
    nested = hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in nested.values()):
        raise LladaError(
            f"{source}: rope_parameters differ per layer type ({sorted(nested)}); our blocks "
            "share one RoPE; convert a checkpoint with one rope_parameters dict"
        )
    params = {**(hf.get("rope_scaling") or {}), **nested}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise LladaError(
            f"{source}: partial_rotary_factor={partial} is not implemented (RoPE on the whole "
            "head only); convert a checkpoint without it"
        )
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return theta, {}
    if kind == "dynamic":
        raise LladaError(
            f"{source}: rope type 'dynamic' (dynamic NTK) changes RoPE with the run-time length "
            "beyond max_position_embeddings, which one fixed rotary table cannot reproduce; "
            "remove rope_scaling to convert it as plain RoPE (the same model up to "
            f"max_position_embeddings={hf.get('max_position_embeddings')} tokens)"
        )
    if kind not in ("linear", "llama3", "yarn"):
        raise LladaError(
            f"{source}: rope type {kind!r} is not implemented (plain, linear, llama3 and yarn "
            "are); convert a checkpoint without this rope scaling"
        )
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    missing = [k for k in needed.get(kind, ()) if params.get(k) is None]
    if missing:
        raise LladaError(
            f"{source}: rope type {kind!r} needs {missing}; the rope scaling is incomplete"
        )
    factor = params.get("factor")
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(factor)}
    # transformers' order: a top-level value (Phi-3 style) wins over the rope dict's
    original = int(
        hf.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or hf["max_position_embeddings"]
    )
    if kind == "llama3":
        keys = ("low_freq_factor", "high_freq_factor")
        return theta, {
            "rope_type": "llama3", "factor": float(factor),
            "original_max_position_embeddings": original,
            **{k: float(params[k]) for k in keys},
        }  # fmt: skip
    if factor is None:  # DeepSeek-V3 style: the extension ratio of the two lengths
        factor = hf["max_position_embeddings"] / original
    factor = float(factor)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return theta, {
        "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
        "beta_fast": float(params.get("beta_fast") or 32),
        "beta_slow": float(params.get("beta_slow") or 1),
        "truncate": bool(params.get("truncate", True)),
        "attention_factor": float(attention_factor),
    }  # fmt: skip


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for an extension ``scale`` (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
    head_dim = int(hf.get("head_dim") or 0)  # Qwen3, Mistral Nemo: not hidden_size / heads
    theta, scaling = rope_settings(hf, source)
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
        rope_theta=theta,
        rope_scaling_params=scaling,
        head_dim_override=head_dim if head_dim and head_dim * heads != d else 0,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_sequence_length=int(hf.get("max_position_embeddings", 2048)),
        init_std=float(hf.get("initializer_range", 0.02)),
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
        bos_token_id=bos if bos is not None else eos,
        mask_token_id=eos,  # placeholder: the converter sets the real mask id
        **extra,
    )
