"""Evaluation: answer extraction, method dispatch, GSM8K-style accuracy, lm-eval adapter."""

from llada_train.eval.answers import extract_boxed, extract_gsm8k, get_extractor
from llada_train.eval.decode import (
    DECODERS,
    DecodeConfig,
    DecodeResult,
    decode_batch,
    decode_config,
)
from llada_train.eval.gsm8k import EvalReport, evaluate_generation, load_jsonl
from llada_train.eval.text import TextCodec

__all__ = [
    "DECODERS",
    "DecodeConfig",
    "DecodeResult",
    "EvalReport",
    "TextCodec",
    "decode_batch",
    "decode_config",
    "evaluate_generation",
    "extract_boxed",
    "extract_gsm8k",
    "get_extractor",
    "load_jsonl",
]
