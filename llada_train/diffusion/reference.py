"""The reference model of post-training (VRPO's DPO, ESPO's KL): its ELBOs without gradients.

``objective.reference``:

- ``frozen_copy``: ``objective.reference_path`` (default ``init_from``) loaded once per rank
  in the policy's dtype, frozen, never sharded and never checkpointed (a resume re-reads it);
  one more full model per rank (16 GB at 8B in bf16; ``scripts/memory_plan.py``).
- ``lora_base``: the policy itself with its LoRA adapters switched off; no extra weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from llada_train.diffusion.objective_base import ObjectiveConfig
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

REFERENCES = ("frozen_copy", "lora_base")


def check_reference_config(reference: ModelConfig, policy: ModelConfig, where: str) -> None:
    """The reference's architecture (its config.json fields) must equal the policy's."""
    ref, pol = reference.to_llada_json(), policy.to_llada_json()
    diff = sorted(k for k in set(ref) | set(pol) if ref.get(k) != pol.get(k))
    if diff:
        k = diff[0]
        raise LladaError(
            f"reference model {where} differs from the policy in {k} ({ref.get(k)!r} vs "
            f"{pol.get(k)!r}; {len(diff)} fields differ): point objective.reference_path at the "
            "policy's starting weights (the SFT model)"
        )


def check_reference(cfg: ObjectiveConfig, model_cfg: ModelConfig) -> None:
    """Start-up checks of ``objective.reference`` against the policy (before any process group)."""
    from llada_train.model.checkpoint import read_config

    if cfg.reference not in REFERENCES:
        raise LladaError(
            f"objective.reference={cfg.reference!r}; use one of {', '.join(REFERENCES)}"
        )
    if cfg.reference == "frozen_copy":
        if not cfg.reference_path:
            raise LladaError(
                "objective.reference=frozen_copy needs the reference weights: set init_from "
                "(objective.reference_path defaults to it), or use objective.reference="
                "lora_base with peft=lora"
            )
        check_reference_config(read_config(cfg.reference_path), model_cfg, cfg.reference_path)


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """The model with its peft LoRA layers switched off (the base), restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise LladaError(
            "objective.reference=lora_base needs LoRA adapters on the policy: set peft=lora, or "
            "use objective.reference=frozen_copy"
        )
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:  # peft makes the active adapter trainable again
            m.enable_adapters(True)


class Reference:
    """Where the reference's passes run: a frozen copy (loaded on first use) or the policy
    with its adapters off. ``scope(model)`` yields the module to call without gradients."""

    def __init__(self, mode: str, path: str | None) -> None:
        if mode not in REFERENCES:
            raise LladaError(f"objective.reference={mode!r}; use one of {', '.join(REFERENCES)}")
        self.mode, self.path = mode, path
        self._frozen: nn.Module | None = None

    def frozen_copy(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The reference weights on ``device`` in the policy's dtype (loaded on first use)."""
        if self._frozen is None:
            from llada_train.model.checkpoint import load_pretrained

            dtype = next(getattr(model, "module", model).parameters()).dtype
            frozen = load_pretrained(self.path, device=str(device), dtype=dtype)
            self._frozen = frozen.requires_grad_(False)
        return self._frozen

    @contextlib.contextmanager
    def scope(self, model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
        """The module whose outputs are the reference's, under ``torch.no_grad``."""
        with torch.no_grad():
            if self.mode == "lora_base":
                with adapters_disabled(getattr(model, "module", model)):
                    yield model
            else:
                yield self.frozen_copy(model, device)
