"""Check that a tokenizer fits a model: vocabulary inside the embedding, special ids agree."""

from __future__ import annotations

from llada_train.data.tokenizer import load_tokenizer, vocab_size_of
from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

MASK_TOKEN = "<|mdm_mask|>"
EOS_TOKEN = "<|endoftext|>"

__all__ = ["check_tokenizer_fits", "load_tokenizer"]


def check_tokenizer_fits(tokenizer, cfg: ModelConfig, where: str) -> None:
    """The vocabulary must fit the embedding, and the MASK/EOS ids must agree with the model."""
    size = vocab_size_of(tokenizer)
    if size > cfg.vocab_size:
        raise LladaError(
            f"tokenizer {where} has {size} tokens but the model's vocab_size is {cfg.vocab_size}: "
            f"set model.vocab_size>={size} or use the model's own tokenizer"
        )
    for token, field in ((MASK_TOKEN, "mask_token_id"), (EOS_TOKEN, "eos_token_id")):
        tid = tokenizer.token_to_id(token)
        if tid is not None and tid != getattr(cfg, field):
            raise LladaError(
                f"tokenizer {where} maps {token} to {tid} but model.{field}={getattr(cfg, field)}: "
                f"set model.{field}={tid}"
            )
