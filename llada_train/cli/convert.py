"""``llada-convert``: a Hugging Face Llama/Qwen2/Qwen3/Mistral folder -> a released-layout export.

    llada-convert --from path/to/Qwen2.5-0.5B --out runs/qwen_mdm
                  [--family auto|llama|qwen2|qwen3|mistral]
                  [--mask-token '<|mdm_mask|>'] [--shift-logits] [--causal]

Reads config.json and the safetensors weights (single file or sharded), renames them through
the family's state-dict adapter (``llada_train/model/adapters``; RoPE scaling, q/k norm and an
explicit head width go into the config), duplicates a tied embedding into the head, and adds a
mask token when the tokenizer has none (a new embedding and head row set to the mean row). The export is bidirectional (``causal: false``) for diffusion
training unless ``--causal`` keeps the AR model as it was. Nothing is written on any error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llada_train.errors import LladaError, exit_on_error
from llada_train.model.adapters import adapter_for
from llada_train.model.adapters.base import OURS
from llada_train.model.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    open_safetensors,
    save_pretrained,
    weight_files,
)
from llada_train.model.config import ModelConfig
from llada_train.model.transformer import LLaDAModel

MASK_TOKEN = "<|mdm_mask|>"


@dataclass
class ConvertResult:
    """What ``convert`` wrote, for the CLI's summary and for tests."""

    out: Path
    family: str
    config: ModelConfig
    tied: bool
    mask_added: bool  # a new mask token/row was made (False: the tokenizer had one)
    grown_rows: int  # embedding rows added (0 or 1)


def read_hf(src: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The folder's config.json and every safetensors tensor (single file or shards)."""
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise LladaError(f"{cfg_path} not found: --from must be a Hugging Face model folder")
    if not (src / SINGLE_NAME).is_file() and not (src / INDEX_NAME).is_file():
        raise LladaError(
            f"{src}: no {SINGLE_NAME} or {INDEX_NAME}; llada-convert reads safetensors "
            "weights only (re-save the model with save_pretrained(safe_serialization=True))"
        )
    hf = json.loads(cfg_path.read_text())
    tensors: dict[str, torch.Tensor] = {}
    handles: dict[Path, Any] = {}
    for name, f in weight_files(src).items():
        if f not in handles:
            handles[f] = open_safetensors(f)
        tensors[name] = handles[f].get_tensor(name)
    return hf, tensors


def check_shapes(ours: dict[str, torch.Tensor], cfg: ModelConfig, src: Path) -> None:
    """Names and shapes against a model built from ``cfg`` (meta device: no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LLaDAModel(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise LladaError(
            f"{src}: the weights lack {missing[0].removeprefix(OURS)!r} (and {len(missing) - 1} "
            "more) that config.json implies; the checkpoint is incomplete or another layout"
        )
    for name, shape in expected.items():
        got = tuple(ours[name].shape)
        if got != shape:
            raise LladaError(
                f"{src}: {name.removeprefix(OURS)} has shape {got} but config.json implies "
                f"{shape}; config.json does not match the weights"
            )


def add_mask_token(src: Path, stage: Path, mask_token: str, rows: int) -> tuple[int, bool]:
    """(mask id, whether it is new); writes the tokenizer files, mask token added, to ``stage``.

    Without a tokenizer.json in ``src`` the mask id is ``rows`` (a new last row).
    """
    tok_path = src / "tokenizer.json"
    if not tok_path.is_file():
        return rows, True
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > rows:
        raise LladaError(
            f"{tok_path}: the tokenizer has {size} tokens but the embedding only {rows} rows; "
            "the tokenizer belongs to another model"
        )
    mask_id = tok.token_to_id(mask_token)
    new = mask_id is None
    if new:
        tok.add_special_tokens([AddedToken(mask_token, special=True, normalized=False)])
        mask_id = tok.token_to_id(mask_token)
    tok.save(str(stage / "tokenizer.json"))
    for name, patch in (("tokenizer_config.json", True), ("special_tokens_map.json", False)):
        if not (src / name).is_file():
            continue
        data = json.loads((src / name).read_text())
        data["mask_token"] = mask_token
        if patch and new and isinstance(data.get("added_tokens_decoder"), dict):
            data["added_tokens_decoder"][str(mask_id)] = {
                "content": mask_token, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True,
            }  # fmt: skip
        (stage / name).write_text(json.dumps(data, indent=2, ensure_ascii=False))
    return mask_id, new


def set_mask_row(ours: dict[str, torch.Tensor], mask_id: int, rows: int) -> int:
    """Give the embedding and the head a row ``mask_id`` equal to their mean row (grown by
    one when ``mask_id == rows``); returns the rows added."""
    grow = max(0, mask_id + 1 - rows)
    for key in (OURS + "wte.weight", OURS + "ff_out.weight"):
        w = ours[key]  # (rows, d)
        mean = w.float().mean(dim=0).to(w.dtype)  # the average token: no prior on the mask
        if grow:
            w = torch.cat([w, mean.expand(grow, -1)], dim=0)
        else:
            w = w.clone()
            w[mask_id] = mean
        ours[key] = w
    return grow


def convert(
    src: str | Path,
    out: str | Path,
    family: str = "auto",
    mask_token: str = MASK_TOKEN,
    causal: bool = False,
    shift_logits: bool = False,
) -> ConvertResult:
    """Convert a Hugging Face Llama/Qwen2/Qwen3/Mistral folder into a released-layout export."""
    src, out = Path(src), Path(out)
    hf, tensors = read_hf(src)
    adapter = adapter_for(hf, family, str(src / "config.json"))
    cfg = adapter.model_config(hf)
    tied = bool(hf.get("tie_word_embeddings", False))
    ours = adapter.to_ours(tensors, tied)
    check_shapes(ours, cfg, src)
    rows = ours[OURS + "wte.weight"].shape[0]
    with tempfile.TemporaryDirectory(prefix=".llada-convert") as tmp:
        stage = Path(tmp)
        mask_id, new = add_mask_token(src, stage, mask_token, rows)
        grown = set_mask_row(ours, mask_id, rows) if new else 0
        cfg = dataclasses.replace(
            cfg, vocab_size=rows + grown, mask_token_id=mask_id, causal=causal,
            shift_logits=shift_logits,
        )  # fmt: skip
        has_tokenizer = (stage / "tokenizer.json").is_file()
        save_pretrained(ours, cfg, out, tokenizer_dir=stage if has_tokenizer else None)
    for extra in ("generation_config.json",):  # harmless and useful beside the export
        if (src / extra).is_file():
            shutil.copy2(src / extra, out / extra)
    return ConvertResult(out, adapter.family, cfg, tied, new, grown)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from",
        dest="src",
        type=Path,
        required=True,
        help="Hugging Face folder: config.json + safetensors (+ tokenizer.json)",
    )
    parser.add_argument("--out", type=Path, required=True, help="export folder (released layout)")
    parser.add_argument(
        "--family", default="auto", help="auto (from model_type), llama, qwen2, qwen3 or mistral"
    )
    parser.add_argument(
        "--mask-token",
        default=MASK_TOKEN,
        help=f"mask token text, added when the tokenizer lacks it ({MASK_TOKEN})",
    )
    parser.add_argument(
        "--shift-logits",
        action="store_true",
        help="position i predicts token i+1: reuse the AR head (Dream-7B)",
    )
    parser.add_argument(
        "--causal",
        action="store_true",
        help="keep causal attention (AR twin / parity checks), not diffusion",
    )
    args = parser.parse_args(argv)
    if args.out.resolve() == args.src.resolve():
        raise LladaError(f"--out {args.out} is the source folder; choose a new folder")
    r = convert(args.src, args.out, args.family, args.mask_token, args.causal, args.shift_logits)
    c = r.config
    how = "added" if r.mask_added else "found in the tokenizer"
    features = [f"head_dim {c.head_dim}"] if c.head_dim_override else []
    features += ["q/k norm"] if c.qk_norm else []
    if c.rope_scaling_params:
        features.append(
            f"rope {c.rope_scaling_params['rope_type']} x{c.rope_scaling_params['factor']}"
        )
    features += ["tied head copied"] if r.tied else []
    print(
        f"converted {r.family} ({c.n_layers} layers, d {c.d_model}, {c.n_heads}/{c.n_kv_heads} "
        f"heads, vocab {c.vocab_size}{''.join(', ' + f for f in features)}) to {r.out}; "
        f"mask token id {c.mask_token_id} ({how}, +{r.grown_rows} rows), causal={c.causal}, "
        f"shift_logits={c.shift_logits}"
    )


if __name__ == "__main__":
    main()
