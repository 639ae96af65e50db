"""Mistral family (``MistralForCausalLM``) <-> our released layout: Llama's names and block."""

from __future__ import annotations

from typing import Any

from llada_train.errors import LladaError
from llada_train.model.adapters.llama import LlamaAdapter
from llada_train.model.config import ModelConfig


class MistralAdapter(LlamaAdapter):
    """Mistral checkpoints are the Llama layout (optionally an explicit ``head_dim``, as in
    Mistral Nemo) plus a causal ``sliding_window``."""

    family = "mistral"
    model_types = ("mistral",)

    def model_config(self, hf: dict[str, Any]) -> ModelConfig:
        """Mistral's config.json. A sliding window at least ``max_position_embeddings`` long
        never hides a key from any sequence the model takes, so full attention is the same
        model and the window is dropped; a shorter one would change attention and is refused."""
        window, longest = hf.get("sliding_window"), int(hf.get("max_position_embeddings", 2048))
        if window is not None and int(window) < longest:
            raise LladaError(
                f"{self.source}: sliding_window={window} < max_position_embeddings={longest} "
                "would hide keys further back than the window, which our full attention does not "
                f"do; set max_position_embeddings to at most {window} in config.json to convert "
                "it for sequences up to that length"
            )
        return super().model_config(hf)
