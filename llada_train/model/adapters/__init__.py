"""State-dict adapters: Hugging Face model families <-> our released layout (``llada-convert``)."""

from __future__ import annotations

from typing import Any

from llada_train.errors import LladaError
from llada_train.model.adapters.base import StateDictAdapter
from llada_train.model.adapters.llama import LlamaAdapter
from llada_train.model.adapters.qwen2 import Qwen2Adapter

ADAPTERS: dict[str, type[StateDictAdapter]] = {"llama": LlamaAdapter, "qwen2": Qwen2Adapter}


def adapter_for(hf: dict[str, Any], family: str, source: str) -> StateDictAdapter:
    """The adapter for ``family`` ("auto": from ``model_type``), refusing other architectures."""
    if family == "auto":
        kind = hf.get("model_type")
        family = next((f for f, a in ADAPTERS.items() if kind in a.model_types), "")
        if not family:
            raise LladaError(
                f"{source}: model_type={kind!r} (architectures {hf.get('architectures')}) is not "
                f"supported; llada-convert reads the {' and '.join(ADAPTERS)} families"
            )
    elif family not in ADAPTERS:
        raise LladaError(f"--family {family!r} is unknown; use auto or one of {sorted(ADAPTERS)}")
    elif hf.get("model_type") not in ADAPTERS[family].model_types:
        raise LladaError(
            f"{source}: model_type={hf.get('model_type')!r} is not a {family} model; "
            "pass the matching --family or --family auto"
        )
    return ADAPTERS[family](source)


__all__ = ["ADAPTERS", "LlamaAdapter", "Qwen2Adapter", "StateDictAdapter", "adapter_for"]
