"""Typed roots of ``conf/generate.yaml`` and ``conf/eval.yaml`` (strict: unknown keys fail)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from llada_train.chat import ChatTemplate
from llada_train.errors import LladaError
from llada_train.eval.decode import DecodeConfig, method_of, register_decode_schemas
from llada_train.eval.perplexity import PerplexityConfig
from llada_train.schema import stray_keys


@dataclass
class ModelSourceConfig:
    """A released-layout model folder, its tokenizer and how prompts are written."""

    model_path: str = MISSING  # folder with config.json + safetensors (+ tokenizer.json)
    adapter: str | None = None  # LoRA adapter folder merged into model_path (the base)
    tokenizer: str | None = None  # tokenizer.json or its folder; default: model_path
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # float32 | bfloat16 | float16
    chat: bool = False  # wrap each prompt as a user turn of the SPEC §1 chat template
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)  # its token strings
    system: str | None = None  # chat: a system message before the user turn
    add_bos: bool = True  # raw prompts: prepend the model's bos_token_id when missing
    eot_token: str | None = None  # stop token beside EOS; chat: default chat_template.eot
    batch_size: int = 8
    progress: bool = True


@dataclass
class GenerateConfig(ModelSourceConfig):
    """Root of ``conf/generate.yaml``: complete prompts and print them with their NFE."""

    prompts: list[str] = field(default_factory=list)
    # added to ``prompts``: .jsonl, one {"prompt": "..."} per line (prompts may hold newlines);
    # any other file, one prompt per non-empty line
    prompt_file: str | None = None
    # true: \n, \t and \\ in ``prompts`` become newline, tab and backslash. Off by default,
    # since a prompt may mean a literal backslash (code); Hydra itself keeps them literal.
    prompt_escapes: bool = False
    decode: DecodeConfig = MISSING  # a conf/decode option: decode=<method>


@dataclass
class EvalConfig(ModelSourceConfig):
    """Root of ``conf/eval.yaml``: accuracy and NFE on GSM8K-style jsonl, or perplexity."""

    task: str = "gsm8k"  # gsm8k: generate and grade | ppl: ELBO perplexity of a corpus
    data_path: str = MISSING  # gsm8k: jsonl with question / answer fields; ppl: .txt or .jsonl
    limit: int | None = None  # first N records only
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_template: str = "{question}"  # how a question becomes the prompt (then chat)
    extractor: str = "gsm8k"  # gsm8k | boxed | auto | last_number
    output: str | None = None  # write per-item predictions as jsonl here
    decode: DecodeConfig = MISSING  # a conf/decode option: decode=<method>
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)  # task=ppl settings


def register_eval_configs() -> None:
    """Register the schemas named by ``conf/generate.yaml`` and ``conf/eval.yaml``."""
    cs = ConfigStore.instance()
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    register_decode_schemas()


def to_schema(cfg: DictConfig) -> Any:
    """The composed config as its dataclass; a required key left at ``???`` or a key outside
    the schema is a one-line error."""
    stray = stray_keys(cfg)
    if stray:
        raise LladaError(f"{stray[0]}: remove it (a decode method takes only its own settings)")
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a required key"
        raise LladaError(f"{key} is required: pass {key}=<value> on the command line") from None
    if isinstance(getattr(obj, "decode", None), DecodeConfig):
        method_of(obj.decode)  # decode.method must name the chosen group option
    return obj
