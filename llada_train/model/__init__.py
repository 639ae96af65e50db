"""The LLaDA mask predictor, its config, its prefix KV cache and its released checkpoint layout."""

from llada_train.model.checkpoint import load_pretrained, read_config, save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.model.kv_cache import PrefixCache
from llada_train.model.transformer import LLaDAModel, count_parameters

__all__ = [
    "LLaDAModel",
    "ModelConfig",
    "PrefixCache",
    "count_parameters",
    "load_pretrained",
    "read_config",
    "save_pretrained",
]
