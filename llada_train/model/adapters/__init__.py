"""State-dict adapters: Hugging Face model families <-> our released layout (``llada-convert``)."""

from __future__ import annotations

from typing import Any

from llada_train.errors import LladaError
from llada_train.model.adapters.base import StateDictAdapter
from llada_train.model.adapters.llada2_moe import LLaDA2MoeAdapter
from llada_train.model.adapters.lladamoe import LLaDAMoEAdapter, is_lladamoe_config
from llada_train.model.adapters.llama import LlamaAdapter
from llada_train.model.adapters.mistral import MistralAdapter
from llada_train.model.adapters.qwen2 import Qwen2Adapter
from llada_train.model.adapters.qwen3 import Qwen3Adapter

ADAPTERS: dict[str, type[StateDictAdapter]] = {
    "llama": LlamaAdapter,
    "qwen2": Qwen2Adapter,
    "qwen3": Qwen3Adapter,
    "mistral": MistralAdapter,
    "llada2_moe": LLaDA2MoeAdapter,
    "lladamoe": LLaDAMoEAdapter,
}


def adapter_for(hf: dict[str, Any], family: str, source: str) -> StateDictAdapter:
    """The adapter for ``family`` ("auto": from ``model_type``), refusing other architectures."""
    if family in ("auto", "lladamoe") and is_lladamoe_config(hf):
        return LLaDAMoEAdapter(source)  # its Hub config says model_type "llada": by its fields
    if family == "auto":
        kind = hf.get("model_type")
        family = next((f for f, a in ADAPTERS.items() if kind in a.model_types), "")
        if not family:
            raise LladaError(
                f"{source}: model_type={kind!r} (architectures {hf.get('architectures')}) is not "
                f"supported; llada-convert reads the {', '.join(ADAPTERS)} families"
            )
    elif family not in ADAPTERS:
        raise LladaError(f"--family {family!r} is unknown; use auto or one of {sorted(ADAPTERS)}")
    elif hf.get("model_type") not in ADAPTERS[family].model_types:
        raise LladaError(
            f"{source}: model_type={hf.get('model_type')!r} is not a {family} model; "
            "pass the matching --family or --family auto"
        )
    return ADAPTERS[family](source)


__all__ = [
    "ADAPTERS",
    "LLaDA2MoeAdapter",
    "LLaDAMoEAdapter",
    "LlamaAdapter",
    "MistralAdapter",
    "Qwen2Adapter",
    "Qwen3Adapter",
    "StateDictAdapter",
    "adapter_for",
]
