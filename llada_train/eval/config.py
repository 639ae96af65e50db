"""Typed roots of ``conf/generate.yaml`` and ``conf/eval.yaml`` (strict: unknown keys fail)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from llada_train.errors import LladaError
from llada_train.eval.methods import DecodeConfig


@dataclass
class ModelSourceConfig:
    """A released-layout model folder, its tokenizer and how prompts are written."""

    model_path: str = MISSING  # folder with config.json + safetensors (+ tokenizer.json)
    tokenizer: str | None = None  # tokenizer.json or its folder; default: model_path
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # float32 | bfloat16 | float16
    chat_template: str | None = None  # "llada", a format string with {prompt}, or null (raw prompt)
    add_bos: bool = True  # prepend the model's bos_token_id when the prompt lacks it
    eot_token: str | None = None  # end-of-turn token string of chat models, e.g. <|eot_id|>
    batch_size: int = 8
    progress: bool = True


@dataclass
class GenerateConfig(ModelSourceConfig):
    """Root of ``conf/generate.yaml``: complete prompts and print them with their NFE."""

    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None  # one prompt per line, added to ``prompts``
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class EvalConfig(ModelSourceConfig):
    """Root of ``conf/eval.yaml``: accuracy and NFE on GSM8K-style jsonl."""

    data_path: str = MISSING  # jsonl with question / answer fields
    limit: int | None = None  # first N records only
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_template: str = "{question}"  # how a question becomes the prompt (before chat_template)
    extractor: str = "gsm8k"  # gsm8k | boxed | auto | last_number
    output: str | None = None  # write per-item predictions as jsonl here
    decode: DecodeConfig = field(default_factory=DecodeConfig)


def register_eval_configs() -> None:
    """Register the schemas named by ``conf/generate.yaml`` and ``conf/eval.yaml``."""
    cs = ConfigStore.instance()
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def to_schema(cfg: DictConfig) -> Any:
    """The composed config as its dataclass; a required key left at ``???`` is a one-line error."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a required key"
        raise LladaError(f"{key} is required: pass {key}=<value> on the command line") from None
