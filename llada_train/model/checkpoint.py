"""Save and load models in the released LLaDA layout: ``config.json`` + safetensors shards.

The layout is the state-dict adapter of this package: parameter names are already the
released ones, so import and export are plain copies. The weights are the parameters plus
the persistent buffers (the MoE routers' fp32 ``expert_bias``): ``named_weights``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llada_train.atomic import write_json_atomic
from llada_train.errors import LladaError
from llada_train.hf.export import write_hf_files
from llada_train.model.config import ModelConfig
from llada_train.model.transformer import LLaDAModel

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``state_dict`` (released names) as a folder loadable by ``load_pretrained``.

    The folder is assembled under a temporary name and renamed into place at the end, so a
    crash never leaves a half-written export.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], tmp_dir / SINGLE_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp_dir / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json_atomic(tmp_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    llada_json = cfg.to_llada_json()
    some = next(iter(tensors.values()))
    llada_json["torch_dtype"] = str(some.dtype).removeprefix("torch.")
    write_json_atomic(tmp_dir / "config.json", llada_json)
    write_hf_files(tmp_dir)  # modeling files + auto_map: transformers' trust_remote_code loads it
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp_dir, cfg)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


def copy_tokenizer_files(src: str | Path, dst: Path, cfg: ModelConfig | None = None) -> None:
    """Copy tokenizer files from a folder, or a ``tokenizer.json`` path (with the HF config
    files beside it), into ``dst``; with ``cfg``, write a ``tokenizer_config.json`` the source
    lacks, so ``AutoTokenizer.from_pretrained(dst)`` can load the export."""
    src = Path(src)
    if src.is_file():
        shutil.copy2(src, dst / "tokenizer.json")
        folder = src.parent if src.name == "tokenizer.json" else None
    else:
        folder = src
    for name in TOKENIZER_FILES:
        if folder is not None and (folder / name).is_file() and not (dst / name).exists():
            shutil.copy2(folder / name, dst / name)
    if cfg is not None and (dst / "tokenizer.json").is_file():
        if not (dst / "tokenizer_config.json").exists():
            write_json_atomic(dst / "tokenizer_config.json", tokenizer_config(dst / "tokenizer.json", cfg))
        if not (dst / "special_tokens_map.json").exists():
            config = json.loads((dst / "tokenizer_config.json").read_text())
            specials = {k: v for k, v in config.items() if k in _SPECIAL_KEYS and isinstance(v, str)}
            write_json_atomic(dst / "special_tokens_map.json", specials)


_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "mask_token")


def tokenizer_config(tokenizer_json: Path, cfg: ModelConfig) -> dict[str, Any]:
    """A HF ``tokenizer_config.json`` for a bare tokenizer.json: the model's special tokens,
    and the LLaDA chat template when the vocabulary has its tokens."""
    from tokenizers import Tokenizer

    from llada_train.chat import ChatTemplate

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.mask_token_id)
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, i in zip(_SPECIAL_KEYS, ids, strict=True):
        token = tok.id_to_token(i) if i is not None else None
        if token is not None:
            out[key] = token
    out["model_max_length"] = cfg.max_sequence_length
    t = ChatTemplate()
    if all(tok.token_to_id(s) is not None for s in (t.bos, t.header_start, t.header_end, t.eot)):
        out["chat_template"] = (
            t.bos + "{% for m in messages %}" + t.header_start + "{{ m['role'] }}"
            + t.header_end + "\n\n{{ m['content'] }}" + t.eot + "{% endfor %}"
            "{% if add_generation_prompt %}" + t.header_start + t.assistant_role + t.header_end
            + "\n\n{% endif %}"
        )
    return out


def read_config(folder: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a released-layout folder."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise LladaError(f"{path} not found: a model folder needs config.json next to its safetensors")
    return ModelConfig.from_llada_json(json.loads(path.read_text()), source=str(path))


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it; checks every shard exists."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise LladaError(f"{index} is not a valid safetensors index (truncated or corrupt): "
                             "copy the complete checkpoint") from None
        files = {name: folder / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise LladaError(f"{f} is listed in {index} but missing: copy the complete checkpoint")
        return files
    single = folder / SINGLE_NAME
    if not single.exists():
        raise LladaError(f"no {SINGLE_NAME} or {INDEX_NAME} in {folder}: not a released-layout model folder")
    return dict.fromkeys(open_safetensors(single).keys(), single)


def open_safetensors(path: Path) -> Any:
    """``safe_open(path)``, refusing an unreadable file with one line that names it."""
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # SafetensorError is not importable under a stable name
        head = b""
        if path.is_file():
            with open(path, "rb") as fh:
                head = fh.read(2)
        # a zip (torch.save) or a pickle stream: never unpickled here, only named
        kind = "a PyTorch/pickle file, " if head[:2] == b"PK" or head[:1] == b"\x80" else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.removeprefix("Error while deserializing header: ")
        raise LladaError(
            f"{path} is not a readable safetensors file ({kind}{reason}): it is truncated, "
            "corrupt or another format; copy it again, or convert it with safetensors' save_file"
        ) from None


def check_weights(folder: str | Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Open every safetensors file of ``folder`` (headers only) and check its tensor names and
    shapes against ``expected``; returns each tensor name's open file."""
    files = weight_files(folder)
    missing, extra = sorted(set(expected) - set(files)), sorted(set(files) - set(expected))
    if missing or extra:
        raise LladaError(
            f"{folder}: weights do not match config.json (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); is this a LLaDA checkpoint?"
        )
    handles: dict[Path, Any] = {}
    for name, want in expected.items():
        f = files[name]
        if f not in handles:
            handles[f] = open_safetensors(f)
        shape = tuple(handles[f].get_slice(name).get_shape())
        if shape != want:
            raise LladaError(
                f"{f}: {name} has shape {shape} but config.json implies {want}; "
                "config.json does not match the weights"
            )
    return {name: handles[f] for name, f in files.items()}


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a released-layout folder holds for ``model``: its parameters, then its
    persistent buffers (the MoE expert biases, fp32 buffers so that ZeRO-3 leaves them whole
    and unrounded). The names are the state dict's."""
    yield from model.named_parameters()
    for owner_name, owner in model.named_modules():
        prefix = f"{owner_name}." if owner_name else ""
        for name, buf in owner.named_buffers(recurse=False):
            if buf is not None and name not in owner._non_persistent_buffers_set:
                yield prefix + name, buf


@torch.no_grad()
def load_weights_into(
    model: LLaDAModel,
    folder: str | Path,
    param_context: Callable[[torch.nn.Parameter], Any] | None = None,
) -> None:
    """Copy every tensor of a released-layout folder into ``model``, one tensor at a time.

    Names and shapes are checked against the model; ``param_context(p)`` wraps each
    parameter's copy (ZeRO-3 passes a gather context so no rank ever holds the whole model).
    Buffers (the expert biases) are whole on every rank and keep their own dtype (fp32).
    """
    weights = dict(named_weights(model))
    # a ZeRO-3 partitioned parameter keeps its full shape in ds_shape
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in weights.items()}
    opened = check_weights(folder, shapes)
    for name, p in weights.items():
        gather = param_context if isinstance(p, torch.nn.Parameter) else None  # buffers: whole
        with gather(p) if gather else contextlib.nullcontext():
            p.copy_(opened[name].get_tensor(name).to(p.dtype))


def load_pretrained(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> LLaDAModel:
    """Build a ``LLaDAModel`` from a released-layout folder (ours or GSAI-ML's)."""
    cfg = read_config(folder)
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    model.to_empty(device=device)
    if dtype is not None:
        model.to(dtype)
    load_weights_into(model, folder)
    return model.eval()
