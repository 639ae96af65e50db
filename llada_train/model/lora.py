"""LoRA fine-tuning with the ``peft`` library: config, injection, adapter folders, merging.

``peft=lora`` injects ``peft`` LoRA layers into the model in place
(``inject_adapter_in_model``), after the base weights are loaded, and freezes everything else.
The module tree keeps its names, so ``model.transformer.ln_f`` / ``.ff_out`` stay reachable
and the forward signature is unchanged; a targeted Linear ``x`` becomes ``x.base_layer`` plus
``x.lora_A.default`` / ``x.lora_B.default``.

Targets: a plain name (``q_proj`` ... ``ff_out``) means that Linear in every block, so
``ff_out`` is the MLP down projection, never the output head; the head (also named ``ff_out``)
is opt-in by its full name ``model.transformer.ff_out``. An entry with a dot is a regex
matched against the full module name.

An adapter folder holds peft's ``adapter_config.json`` (``base_model_name_or_path`` names the
base) and ``adapter_model.safetensors`` (peft's key layout), plus ``llada_adapter.json`` with a
fingerprint of the base so an adapter is never merged into another model.

Every ZeRO stage trains LoRA; under ZeRO-3 the frozen head stays gathered once fetched
(see ``_keep_frozen_head_gathered``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llada_train.atomic import write_json_atomic
from llada_train.errors import LladaError

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
HEAD = "model.transformer.ff_out"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INFO = "llada_adapter.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
ADAPTER = "default"  # peft's adapter name inside the live model
# small tensors every LLaDA checkpoint has: their values identify the base cheaply
FINGERPRINT_TENSORS = ("model.transformer.ln_f.weight", "model.transformer.blocks.0.attn_norm.weight")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: ``method: none`` (full) or ``lora``."""

    method: str = "none"  # none | lora
    r: int = 16
    alpha: float = 32.0  # scaling = alpha / r
    # > 0 draws masks from the global RNG (the CPU one is checkpointed, CUDA's is not)
    dropout: float = 0.0
    # block Linear names, or full-name regexes (with a dot), e.g. model.transformer.ff_out
    target_modules: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))


def lora_enabled(cfg: PeftConfig | None) -> bool:
    """True for ``peft.method=lora``; refuses an unknown method."""
    if cfg is None or cfg.method == "none":
        return False
    if cfg.method != "lora":
        raise LladaError(f"peft.method={cfg.method!r} is unknown: use none or lora")
    return True


def _check(cfg: PeftConfig) -> None:
    if cfg.r < 1 or cfg.alpha <= 0 or not 0.0 <= cfg.dropout < 1.0:
        raise LladaError(
            f"peft.r={cfg.r}, peft.alpha={cfg.alpha}, peft.dropout={cfg.dropout}: "
            "need r >= 1, alpha > 0 and 0 <= dropout < 1"
        )
    if not cfg.target_modules:
        raise LladaError(f"peft.target_modules is empty: name some of {list(BLOCK_LINEARS)}")


def _entry_regex(entry: str) -> str:
    if "." in entry:
        return entry
    return rf"model\.transformer\.blocks\.\d+\.{re.escape(entry)}"


def target_regex(targets: list[str]) -> str:
    """The full-match regex handed to peft's ``LoraConfig.target_modules``."""
    return "|".join(f"(?:{_entry_regex(t)})" for t in targets)


def resolve_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linear modules ``targets`` select; an entry matching none is refused."""
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for entry in targets:
        try:
            hits = [n for n in modules if re.fullmatch(_entry_regex(entry), n)]
        except re.error as exc:
            raise LladaError(f"peft.target_modules entry {entry!r} is not a valid regex ({exc})") from None
        others = [n for n in hits if not isinstance(modules[n], torch.nn.Linear)]
        if others:
            raise LladaError(
                f"peft.target_modules entry {entry!r} also matches {others[0]} "
                f"({type(modules[others[0]]).__name__}, not a Linear): make it match Linear layers only"
            )
        if not hits and (experts := _stacked_expert_match(model, entry)):
            raise LladaError(
                f"peft.target_modules entry {entry!r} names the routed experts ({experts}): they are "
                "stacked (E, out, in) tensors that LoRA's Linear adapters cannot wrap; target "
                "attention and the shared expert (q_proj, k_proj, v_proj, attn_out, ff_proj, "
                "up_proj, ff_out) instead"
            )
        if not hits:
            raise LladaError(
                f"peft.target_modules entry {entry!r} matches no Linear module of the model: use "
                f"block names {list(BLOCK_LINEARS)} or a full name such as {HEAD} (the head)"
            )
        chosen.update(hits)
    return sorted(chosen)


def _stacked_expert_match(model: torch.nn.Module, entry: str) -> str | None:
    """The first stacked routed-expert weight (``blocks.N.moe.gate_proj``: a 3-D Parameter, not
    a module) that ``entry`` names, by its full name or as ``blocks.N.gate_proj``; else None."""
    pattern = _entry_regex(entry)
    for name, param in model.named_parameters():
        stacked = param.dim() == 3 and ".moe." in name
        if stacked and (re.fullmatch(pattern, name) or re.fullmatch(pattern, name.replace(".moe.", "."))):
            return name
    return None


def lora_config(cfg: PeftConfig, base: str) -> Any:
    """peft's ``LoraConfig`` for ``cfg``; ``base`` is recorded as the base model's path."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=target_regex(list(cfg.target_modules)), base_model_name_or_path=base,
    )


def inject(model: torch.nn.Module, config: Any, seed: int) -> torch.nn.Module:
    """Inject LoRA layers in place with seeded A matrices (B starts at 0); freeze the rest."""
    from peft import inject_adapter_in_model

    # every rank and ZeRO stage draws the same A; the global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))
    return model


def apply_lora(model: torch.nn.Module, cfg: PeftConfig, init_from: str | None, seed: int) -> None:
    """``peft=lora`` on a built model whose base weights are already loaded (ZeRO 0-3)."""
    _check(cfg)
    if not init_from:
        raise LladaError("peft=lora needs init_from=<base model folder>: LoRA adapts pretrained weights")
    resolve_targets(model, list(cfg.target_modules))
    inject(model, lora_config(cfg, str(Path(init_from).resolve())), seed)
    _keep_frozen_head_gathered(model)


def _keep_frozen_head_gathered(model: torch.nn.Module) -> None:
    """ZeRO-3: once fetched, keep the frozen ``ln_f`` and head weights (never released).

    DeepSpeed 0.19 releases a frozen ZeRO-3 parameter right after its module's forward
    unless some module's backward is running. The chunked loss recomputes ``ln_f`` and the
    head inside the loss's own backward, before any module's, so torch's checkpoint would
    find the recomputed weights already freed ("Recomputed values ... have different
    metadata"). DeepSpeed never releases a parameter it counts as used by another module
    (``is_external_param``, set by its own hooks for such parameters); marking these two
    does the same. Cost: one full head per rank (8B: 126464 x 4096 bf16, ~1 GiB). Trainable
    parameters and the blocks (also under activation checkpointing) need nothing.
    """
    t = model.model.transformer
    for p in [*t.ln_f.parameters(), *t.ff_out.parameters()]:
        if hasattr(p, "ds_id") and not p.requires_grad:
            p.is_external_param = True


def is_adapter_param(name: str) -> bool:
    """True for a LoRA A/B weight's name in a live (injected) model."""
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name


def is_lora(model: torch.nn.Module | None) -> bool:
    """True when ``model`` carries injected peft adapters."""
    return isinstance(getattr(model, "peft_config", None), dict) and ADAPTER in model.peft_config


def live_config(model: torch.nn.Module) -> Any:
    """The ``LoraConfig`` a LoRA model was injected with."""
    return model.peft_config[ADAPTER]


def signature(model: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint's adapters must agree on to resume (saved beside the shards)."""
    c = live_config(model)
    base = c.base_model_name_or_path
    return {"r": c.r, "alpha": c.lora_alpha, "target_modules": c.target_modules,
            "base": base, "base_fingerprint": base_fingerprint(base)}


def to_peft_key(name: str) -> str:
    """``...q_proj.lora_A.default.weight`` -> ``base_model.model....q_proj.lora_A.weight``."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA model's state dict, under peft's file key names."""
    return {to_peft_key(k): v for k, v in state.items() if is_adapter_param(k)}


# ---- adapter folders ------------------------------------------------------------------------
def base_fingerprint(base: str | Path) -> str:
    """sha256 of a few small tensors of a released-layout folder (its norm weights)."""
    from llada_train.model.checkpoint import open_safetensors, weight_files

    files = weight_files(base)
    digest = hashlib.sha256()
    for name in FINGERPRINT_TENSORS:
        t = open_safetensors(files[name]).get_tensor(name).float().contiguous()
        digest.update(name.encode() + t.numpy().tobytes())
    return digest.hexdigest()


def save_adapter(
    state: dict[str, torch.Tensor], config: Any, out_dir: str | Path, tokenizer: str | None = None
) -> Path:
    """Write an adapter folder (peft layout + base fingerprint), assembled then renamed in."""
    from llada_train.model.checkpoint import copy_tokenizer_files

    out_dir = Path(out_dir)
    base = config.base_model_name_or_path
    info = {"base": base, "base_fingerprint": base_fingerprint(base)}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    write_json_atomic(tmp / ADAPTER_INFO, info)
    if tokenizer:
        copy_tokenizer_files(tokenizer, tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` holds peft's ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass
class Adapter:
    """An adapter folder read back: peft config, tensors (peft keys) and its base."""

    folder: Path
    config: Any
    state: dict[str, torch.Tensor]
    base: str
    fingerprint: str | None


def read_adapter(folder: str | Path) -> Adapter:
    """Read an adapter folder written by ``save_adapter`` (or peft, for a LLaDA base)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_adapter_folder(folder) or not (folder / ADAPTER_WEIGHTS).is_file():
        raise LladaError(f"{folder} is not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = LoraConfig.from_pretrained(str(folder))
    info_path = folder / ADAPTER_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    state = load_file(folder / ADAPTER_WEIGHTS)
    base = info.get("base") or config.base_model_name_or_path or ""
    return Adapter(folder, config, state, base, info.get("base_fingerprint"))


def check_base(adapter: Adapter, base: str | Path) -> None:
    """Refuse a base whose fingerprint differs from the one the adapter was trained on."""
    if adapter.fingerprint and base_fingerprint(base) != adapter.fingerprint:
        raise LladaError(
            f"adapter {adapter.folder} was trained on another base than {base} "
            f"(recorded base: {adapter.base}): pass that base model"
        )


@torch.no_grad()
def load_adapter_weights(model: torch.nn.Module, adapter: Adapter) -> None:
    """Copy the adapter's tensors into a model injected with ``adapter.config``; every name
    and shape must agree."""
    live = {to_peft_key(n): p for n, p in model.named_parameters() if is_adapter_param(n)}
    missing, extra = sorted(set(live) - set(adapter.state)), sorted(set(adapter.state) - set(live))
    if missing or extra:
        raise LladaError(
            f"adapter {adapter.folder} does not fit this base (missing {missing[:2]}, unexpected "
            f"{extra[:2]}): it was made for another model"
        )
    for key, p in live.items():
        t = adapter.state[key]
        if tuple(t.shape) != tuple(p.shape):
            raise LladaError(
                f"adapter {adapter.folder}: {key} has shape {tuple(t.shape)} but the base needs "
                f"{tuple(p.shape)}: it was made for another model"
            )
        p.copy_(t.to(p.dtype))


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """peft's merge (W += B @ A * alpha / r) in every LoRA layer, then put the plain Linear
    back, so parameter names are the released ones again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)  # refuses a non-finite merged weight
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def load_merged(
    base: str | Path, adapter: Adapter, device: str = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The base model with the adapter merged in: a plain ``LLaDAModel`` in eval mode."""
    from llada_train.model.checkpoint import load_pretrained

    check_base(adapter, base)
    model = load_pretrained(base, device=device, dtype=dtype)
    targets = re.compile(str(adapter.config.target_modules)) if isinstance(
        adapter.config.target_modules, str) else None
    if targets is not None and not any(targets.fullmatch(n) for n, _ in model.named_modules()):
        raise LladaError(f"adapter {adapter.folder} targets no module of {base}: it was made for another model")
    inject(model, adapter.config, seed=0)
    load_adapter_weights(model, adapter)
    return merge_and_unload(model).eval()
