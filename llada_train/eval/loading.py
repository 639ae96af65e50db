"""Load a released-layout model folder (or a LoRA adapter and its base) and its tokenizer for
generation or evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llada_train.errors import LladaError
from llada_train.eval.text import TextCodec
from llada_train.model import LLaDAModel, load_pretrained, lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class InferenceBundle:
    """A model in eval mode, its text codec and the special ids samplers need."""

    model: LLaDAModel
    codec: TextCodec
    mask_token_id: int
    eos_token_id: int
    eot_token_id: int | None
    pad_token_id: int


def _load_model(cfg) -> tuple[LLaDAModel, str]:
    """The model (a LoRA adapter merged into its base when one is given) and the tokenizer path.

    An adapter comes as ``adapter=<folder>`` (``model_path`` is then the base) or as a
    ``model_path`` that is an adapter folder (its ``adapter_config.json`` names the base).
    """
    dtype = DTYPES[cfg.dtype]
    adapter_path = getattr(cfg, "adapter", None)
    if adapter_path is None and lora.is_adapter_folder(cfg.model_path):
        adapter_path = cfg.model_path
    if adapter_path is None:
        model = load_pretrained(cfg.model_path, device=cfg.device, dtype=dtype).eval()
        return model, cfg.tokenizer or cfg.model_path
    adapter = lora.read_adapter(adapter_path)
    base = cfg.model_path if adapter_path != cfg.model_path else adapter.base
    if not base or not Path(base).is_dir():
        raise LladaError(
            f"base model {base!r} named by adapter {adapter_path} not found: pass "
            f"model_path=<base folder> adapter={adapter_path}"
        )
    model = lora.load_merged(base, adapter, device=cfg.device, dtype=dtype)
    has_tokenizer = (Path(adapter_path) / "tokenizer.json").is_file()
    return model, cfg.tokenizer or (adapter_path if has_tokenizer else base)


def load_for_inference(cfg) -> InferenceBundle:
    """Model + tokenizer from a ``ModelSourceConfig``; ids come from config.json / the tokenizer."""
    if cfg.dtype not in DTYPES:
        raise LladaError(f"dtype={cfg.dtype!r} is unknown; use one of {sorted(DTYPES)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise LladaError(f"device={cfg.device!r} but CUDA is not available; use device=cpu")
    model, tokenizer = _load_model(cfg)
    mcfg = model.config
    codec = TextCodec(
        tokenizer,
        bos_token_id=mcfg.bos_token_id,
        chat=cfg.chat_template if cfg.chat else None,
        add_bos=cfg.add_bos,
        system=cfg.system,
    )
    # a chat model ends its turn with the template's EoT: stop there too
    eot_token = cfg.eot_token or (cfg.chat_template.eot if cfg.chat else None)
    eot = codec.token_id(eot_token) if eot_token else None
    codec.stop_ids = {mcfg.eos_token_id} | ({eot} if eot is not None else set())
    return InferenceBundle(model, codec, mcfg.mask_token_id, mcfg.eos_token_id, eot, mcfg.pad_token_id)
