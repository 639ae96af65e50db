"""The LLaDA mask predictor, its config and its released checkpoint layout."""

from llada_train.model.checkpoint import load_pretrained, read_config, save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.model.transformer import LLaDAModel, count_parameters

__all__ = ["LLaDAModel", "ModelConfig", "count_parameters", "load_pretrained", "read_config", "save_pretrained"]
