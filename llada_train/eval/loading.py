"""Load a released-layout model folder and its tokenizer for generation or evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llada_train.errors import LladaError
from llada_train.eval.text import CHAT_EOT, TextCodec
from llada_train.model import LLaDAModel, load_pretrained

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


def load_for_inference(cfg) -> InferenceBundle:
    """Model + tokenizer from a ``ModelSourceConfig``; ids come from config.json / the tokenizer."""
    if cfg.dtype not in DTYPES:
        raise LladaError(f"dtype={cfg.dtype!r} is unknown; use one of {sorted(DTYPES)}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise LladaError(f"device={cfg.device!r} but CUDA is not available; use device=cpu")
    model = load_pretrained(cfg.model_path, device=cfg.device, dtype=DTYPES[cfg.dtype]).eval()
    mcfg = model.config
    codec = TextCodec(
        cfg.tokenizer or cfg.model_path,
        bos_token_id=mcfg.bos_token_id,
        chat_template=cfg.chat_template,
        add_bos=cfg.add_bos,
    )
    eot_token = cfg.eot_token or CHAT_EOT.get(cfg.chat_template or "")
    eot = codec.token_id(eot_token) if eot_token else None
    codec.stop_ids = {mcfg.eos_token_id} | ({eot} if eot is not None else set())
    return InferenceBundle(model, codec, mcfg.mask_token_id, mcfg.eos_token_id, eot, mcfg.pad_token_id)
