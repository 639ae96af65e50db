"""The decode registry: ``{name: (config class, function)}`` and ``decode_batch`` over it.

Each sampler gets one small dataclass (its own knobs on top of ``DecodeConfig``) and one
function ``run(model, cfg, request) -> DecodeResult``; ``register`` puts both in
``DECODERS``, which also feeds Hydra's ConfigStore (group ``decode``, ``<name>_schema``) so
``conf/decode/<name>.yaml`` is typed and strict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llada_train.errors import LladaError
from llada_train.sample import SampleOutput


@dataclass
class DecodeConfig:
    """Settings every sampler has (SPEC §5); a method's dataclass adds its own."""

    method: str = MISSING  # the registry name; set by each method's dataclass
    gen_length: int = 128
    temperature: float = 0.0  # Gumbel-max temperature; 0 = argmax
    seed: int = 0  # seed of the generator the callers build


@dataclass
class GuidedDecodeConfig(DecodeConfig):
    """Settings of the samplers built on the SPEC §5 step (CFG and EOS rules)."""

    cfg_scale: float = 0.0  # classifier-free guidance w
    forbid_eos: bool = False  # EOS logits set to -inf


@dataclass
class DecodeResult:
    """Per-row text, extracted answer and forward passes spent."""

    texts: list[str]
    answers: list[str | None]
    row_nfe: list[int]
    # (B, G) generated ids where the sampler yields one canvas per row (not hex's vote or
    # infill's two parts): what RL rollouts score
    generated: torch.Tensor | None = None


@dataclass
class DecodeRequest:
    """A left-padded prompt batch and everything a sampler needs besides its config."""

    prompt_ids: torch.Tensor  # (B, P)
    attention_mask: torch.Tensor | None  # (B, P)
    mask_token_id: int
    eos_token_id: int | None
    eot_token_id: int | None
    decode: Callable[[Sequence[int]], str]  # generated ids -> text (stops at EOS/EoT)
    extract: Callable[[str], str | None]  # text -> final answer
    encode: Callable[[str], list[int]] | None = None  # text -> ids (infill's delimiter)
    generator: torch.Generator | None = None
    progress: bool = False

    def common(self) -> dict[str, Any]:
        """Keyword arguments every sampler function takes."""
        return dict(
            mask_token_id=self.mask_token_id,
            attention_mask=self.attention_mask,
            generator=self.generator,
            progress=self.progress,
        )

    def result(self, out: SampleOutput) -> DecodeResult:
        """Texts, answers and per-row NFE of a plain sampler output."""
        texts = [self.decode(row) for row in out.generated.tolist()]
        answers = [self.extract(t) for t in texts]
        return DecodeResult(texts, answers, out.row_nfe.tolist(), out.generated)


DecodeFn = Callable[[torch.nn.Module, Any, DecodeRequest], DecodeResult]


class DecodeMethod(NamedTuple):
    """A registry entry: the method's config dataclass and the function that runs it."""

    config: type[DecodeConfig]
    run: DecodeFn


DECODERS: dict[str, DecodeMethod] = {}


def register(name: str, config: type[DecodeConfig]) -> Callable[[DecodeFn], DecodeFn]:
    """Decorator: make ``fn`` the sampler of ``decode=<name>`` with settings ``config``."""
    if config().method != name:
        raise LladaError(f"decode config {config.__name__} must default method to {name!r}")

    def add(fn: DecodeFn) -> DecodeFn:
        if name in DECODERS:
            raise LladaError(f"decode method {name!r} is registered twice")
        DECODERS[name] = DecodeMethod(config, fn)
        return fn

    return add


def method_of(cfg: DecodeConfig) -> DecodeMethod:
    """The registry entry of ``cfg``; an unknown name or a config of another method is an error."""
    entry = DECODERS.get(cfg.method)
    if entry is None:
        raise LladaError(f"decode.method={cfg.method!r} is unknown; use one of {sorted(DECODERS)}")
    if type(cfg) is not entry.config:
        # e.g. decode.method=random on top of decode=med: the settings are med's
        raise LladaError(
            f"decode.method={cfg.method!r} does not match its settings ({type(cfg).__name__}): "
            f"choose the method with decode={cfg.method}"
        )
    return entry


def decode_config(method: str, **values: Any) -> DecodeConfig:
    """``method``'s config with ``values`` checked and converted as Hydra would (``"4"`` -> 4)."""
    entry = DECODERS.get(method)
    if entry is None:
        raise LladaError(f"decode method {method!r} is unknown; use one of {sorted(DECODERS)}")
    known = {f.name for f in fields(entry.config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LladaError(
            f"decode method {method!r} has no setting(s) {unknown}; its settings: {sorted(known)}"
        )
    try:
        node = OmegaConf.merge(OmegaConf.structured(entry.config), values)
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "a setting"
        msg = str(exc).splitlines()[0]
        raise LladaError(f"decode method {method!r}, {key}: {msg}") from None


def register_decode_schemas() -> None:
    """Store every method's dataclass as ``decode/<name>_schema`` for ``conf/decode/*.yaml``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, entry in DECODERS.items():
        cs.store(group="decode", name=f"{name}_schema", node=entry.config)


def decode_batch(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P), left-padded
    attention_mask: torch.Tensor | None,  # (B, P)
    cfg: DecodeConfig,
    *,
    mask_token_id: int,
    eos_token_id: int | None,
    eot_token_id: int | None,
    decode: Callable[[Sequence[int]], str],
    extract: Callable[[str], str | None],
    encode: Callable[[str], list[int]] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> DecodeResult:
    """Run the configured method on a batch; returns texts, answers and per-row NFE."""
    request = DecodeRequest(
        prompt_ids, attention_mask, mask_token_id, eos_token_id, eot_token_id,
        decode, extract, encode, generator, progress,
    )
    return method_of(cfg).run(model, cfg, request)
