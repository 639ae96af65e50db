"""The built-in samplers (SPEC §5, §7) as registry entries: one dataclass + one function each.

A new sampler is one more dataclass and ``@register`` function here, plus
``conf/decode/<name>.yaml``. Each dataclass holds exactly the knobs its sampler uses, so a
knob of another method is refused when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llada_train.errors import LladaError
from llada_train.eval.decode.base import (
    DecodeConfig,
    DecodeRequest,
    DecodeResult,
    GuidedDecodeConfig,
    register,
)
from llada_train.sample import (
    fast_generate,
    generate,
    hex_generate,
    infill_generate,
    med_generate,
    tolerator_generate,
)
from llada_train.sample.block import block_generate


@dataclass
class LowConfidenceConfig(GuidedDecodeConfig):
    """Fixed-schedule decoding committing the most confident positions (released default)."""

    method: str = "low_confidence"
    steps: int | None = None  # model calls; null = gen_length (one token per step)
    block_length: int | None = 32  # semi-AR block; null = gen_length (pure diffusion)
    eos_zero_confidence: bool = False  # EOS/EoT predictions get confidence 0


@dataclass
class RandomConfig(LowConfidenceConfig):
    """As low-confidence, but the committed positions are a uniformly random subset."""

    method: str = "random"


@register("low_confidence", LowConfidenceConfig)
@register("random", RandomConfig)
def run_generate(
    model: torch.nn.Module, cfg: LowConfidenceConfig, req: DecodeRequest
) -> DecodeResult:
    """``generate`` with ``cfg.method`` as the remasking rule."""
    out = generate(
        model, req.prompt_ids, cfg.gen_length, cfg.steps or cfg.gen_length, cfg.block_length,
        cfg.temperature, cfg.method, cfg_scale=cfg.cfg_scale, eos_token_id=req.eos_token_id,
        eot_token_id=req.eot_token_id, forbid_eos=cfg.forbid_eos,
        eos_zero_confidence=cfg.eos_zero_confidence, **req.common(),
    )
    return req.result(out)


@dataclass
class MedConfig(GuidedDecodeConfig):
    """MED: commit low-entropy positions together while their entropy stays under lambda."""

    method: str = "med"
    block_length: int | None = 32  # null = gen_length
    entropy_threshold: float = 0.2  # lambda


@register("med", MedConfig)
def run_med(model: torch.nn.Module, cfg: MedConfig, req: DecodeRequest) -> DecodeResult:
    """``med_generate``."""
    out = med_generate(
        model, req.prompt_ids, cfg.gen_length, cfg.block_length,
        entropy_threshold=cfg.entropy_threshold, temperature=cfg.temperature,
        cfg_scale=cfg.cfg_scale, eos_token_id=req.eos_token_id, forbid_eos=cfg.forbid_eos,
        **req.common(),
    )
    return req.result(out)


@dataclass
class ThresholdConfig(GuidedDecodeConfig):
    """Fast-dLLM: commit every in-block position at least ``threshold`` confident."""

    method: str = "threshold"
    block_length: int = 32
    threshold: float = 0.9  # tau
    use_cache: bool = False  # approximate prefix KV cache (no CFG)


@register("threshold", ThresholdConfig)
def run_threshold(model: torch.nn.Module, cfg: ThresholdConfig, req: DecodeRequest) -> DecodeResult:
    """``fast_generate``."""
    out = fast_generate(
        model, req.prompt_ids, cfg.gen_length, cfg.block_length, threshold=cfg.threshold,
        use_cache=cfg.use_cache, temperature=cfg.temperature, cfg_scale=cfg.cfg_scale,
        eos_token_id=req.eos_token_id, forbid_eos=cfg.forbid_eos, **req.common(),
    )
    return req.result(out)


@dataclass
class BlockConfig(DecodeConfig):
    """Block diffusion (BD3-LM, LLaDA 2.0): block by block with an exact KV cache, to EOS."""

    method: str = "block"
    block_size: int | None = None  # null = the model's config.block_size (0 there: one block)
    steps: int | None = None  # per block; null = block size (one token per step)
    threshold: float | None = None  # LLaDA 2.0 tau; null = the fixed low-confidence schedule
    minimal_topk: int = 1  # with threshold: commit at least this many per step
    sub_block_size: int | None = None  # Fast-dLLM v2 sub-blocks, filled in order; null = none
    use_cache: bool = True  # exact KV cache of finished blocks
    stop_at_eos: bool = True  # a row ends with the block holding its EOS/EoT


@register("block", BlockConfig)
def run_block(model: torch.nn.Module, cfg: BlockConfig, req: DecodeRequest) -> DecodeResult:
    """``block_generate`` with ``gen_length`` as the (block-rounded) maximum new tokens."""
    out = block_generate(
        model, req.prompt_ids, cfg.gen_length, cfg.block_size, cfg.steps,
        threshold=cfg.threshold, minimal_topk=cfg.minimal_topk,
        sub_block_size=cfg.sub_block_size, temperature=cfg.temperature,
        eos_token_id=req.eos_token_id, eot_token_id=req.eot_token_id,
        stop_at_eos=cfg.stop_at_eos, use_cache=cfg.use_cache, **req.common(),
    )
    return req.result(out)


@dataclass
class HexConfig(GuidedDecodeConfig):
    """HEX: one decode per block length, majority vote on the extracted answers."""

    method: str = "hex"
    block_lengths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    tokens_per_step: int = 2
    eos_zero_confidence: bool = False


@register("hex", HexConfig)
def run_hex(model: torch.nn.Module, cfg: HexConfig, req: DecodeRequest) -> DecodeResult:
    """``hex_generate``; each row shows the first member text that gave the voted answer."""
    hx = hex_generate(
        model, req.prompt_ids, cfg.gen_length, decode=req.decode, extract=req.extract,
        block_lengths=cfg.block_lengths, tokens_per_step=cfg.tokens_per_step,
        temperature=cfg.temperature, cfg_scale=cfg.cfg_scale, eos_token_id=req.eos_token_id,
        eot_token_id=req.eot_token_id, forbid_eos=cfg.forbid_eos,
        eos_zero_confidence=cfg.eos_zero_confidence, **req.common(),
    )
    texts = []
    for answer, answers, member_texts in zip(
        hx.answers, hx.member_answers, hx.member_texts, strict=True
    ):
        texts.append(member_texts[answers.index(answer) if answer in answers else 0])
    return DecodeResult(texts, hx.answers, [hx.nfe] * len(texts))


@dataclass
class ToleratorConfig(DecodeConfig):
    """TOLERATOR: fill-up with an EoT penalty, then cosine-scheduled remask-and-refine rounds."""

    method: str = "tolerator"
    budget: int | None = None  # total forward passes; null = gen_length // 2
    eot_penalty: float = 1.2  # EoT probability divided by this in the fill-up
    rho: float = 0.5  # share of the budget for the fill-up
    gamma_start: float = 0.8  # remask fraction of the first refinement round
    gamma_end: float = 0.4  # ... and of the last (cosine in between)
    block_length: int | None = 32
    refine_temperature: float | None = None  # null = temperature


@register("tolerator", ToleratorConfig)
def run_tolerator(model: torch.nn.Module, cfg: ToleratorConfig, req: DecodeRequest) -> DecodeResult:
    """``tolerator_generate`` with EOS and EoT as the penalised stop tokens."""
    stops = [t for t in (req.eos_token_id, req.eot_token_id) if t is not None]
    out = tolerator_generate(
        model, req.prompt_ids, cfg.gen_length, cfg.budget or cfg.gen_length // 2,
        eot_token_ids=stops, eot_penalty=cfg.eot_penalty, rho=cfg.rho,
        gamma_start=cfg.gamma_start, gamma_end=cfg.gamma_end, block_length=cfg.block_length,
        temperature=cfg.temperature, refine_temperature=cfg.refine_temperature, **req.common(),
    )
    return req.result(out)


@dataclass
class InfillConfig(DecodeConfig):
    """Reasoning-as-infilling: reasoning masks, the delimiter, answer masks (gen_length in all)."""

    method: str = "infill"
    answer_length: int = 8  # answer masks after the delimiter
    delimiter: str = "\n#### "  # text between reasoning and answer
    entropy_threshold: float = 0.2  # lambda of the MED commits
    answer_entropy_threshold: float = 0.1  # gamma of the early exit


@register("infill", InfillConfig)
def run_infill(model: torch.nn.Module, cfg: InfillConfig, req: DecodeRequest) -> DecodeResult:
    """``infill_generate``; the text is reasoning + delimiter + answer."""
    if req.encode is None:
        raise LladaError("decode=infill needs a tokenizer to encode decode.delimiter")
    delim = req.encode(cfg.delimiter)
    reasoning = cfg.gen_length - len(delim) - cfg.answer_length
    if reasoning < 1:
        raise LladaError(
            f"infill: gen_length={cfg.gen_length} leaves no room for reasoning after the delimiter "
            f"({len(delim)} tokens) and answer_length={cfg.answer_length}"
        )
    out = infill_generate(
        model, req.prompt_ids, reasoning, delim, cfg.answer_length,
        entropy_threshold=cfg.entropy_threshold,
        answer_entropy_threshold=cfg.answer_entropy_threshold, temperature=cfg.temperature,
        **req.common(),
    )
    texts = []
    for r_row, a_row in zip(out.reasoning.tolist(), out.answer.tolist(), strict=True):
        reasoning_text = req.decode([t for t in r_row if t != req.mask_token_id])
        texts.append(f"{reasoning_text}{cfg.delimiter}{req.decode(a_row)}")
    return DecodeResult(texts, [req.extract(t) for t in texts], out.row_nfe.tolist())
