"""``llada-export``: consolidate a checkpoint of any ZeRO stage into the released layout.

    llada-export --run-dir runs/x [--tag step_00001000] --out runs/x/export_1000
    llada-export --run-dir runs/lora --out runs/lora/adapter_1000          # a LoRA run's adapter
    llada-export --run-dir runs/lora --merge-lora --out runs/lora/merged    # base + adapter
    llada-export --adapter runs/lora/adapter --merge-lora --out merged      # an adapter folder

Runs in one process on CPU, so a job killed before its own end-of-run export still yields
a model for SFT or the samplers. ``--merge-lora`` writes a plain released-layout folder: the
base (``init_from``) with W + B @ A * alpha / r merged by peft, no LoRA tensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from llada_train.diffusion import ObjectiveConfig
from llada_train.diffusion.registry import prepare_run
from llada_train.errors import LladaError, exit_on_error
from llada_train.model import lora
from llada_train.model.checkpoint import named_weights, save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.train.build import resolve_model_config
from llada_train.train.checkpointing import (
    LORA_STATE,
    checkpoint_dir,
    consolidate_checkpoint,
    latest_tag,
)
from llada_train.train.schedule import ScheduleConfig, curriculum_sizes


def run_model_config(run_dir: Path) -> tuple[ModelConfig, str | None]:
    """The model config and tokenizer path recorded in a run's ``config.yaml``, finished as the
    run's objective finishes it (objective=block records the curriculum's final block size,
    as the end-of-run export does)."""
    cfg = _run_config(run_dir)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    model_cfg = resolve_model_config(model_cfg, cfg.get("init_from"))
    if "objective" in cfg:  # every run of llada-pretrain / llada-sft records it
        obj_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ObjectiveConfig), cfg.objective))
        schedule = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScheduleConfig), cfg.schedule))
        model_cfg = prepare_run(obj_cfg, model_cfg, int(cfg.trainer.seq_len), curriculum_sizes(schedule))
    return model_cfg, cfg.data.get("tokenizer")


def _run_config(run_dir: Path) -> Any:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise LladaError(f"{path} not found: is {run_dir} a llada-train run directory?")
    return OmegaConf.load(path)


def run_peft(run_dir: Path) -> tuple[lora.PeftConfig | None, str | None]:
    """A run's LoRA settings and base (``init_from``), or (None, None) for a full run."""
    cfg = _run_config(run_dir)
    if "peft" not in cfg:
        return None, None
    peft = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(lora.PeftConfig), cfg.peft))
    if not lora.lora_enabled(peft):
        return None, None
    return peft, cfg.get("init_from")


def _tokenizer(arg: str | None, recorded: str | None, where: Path) -> str | None:
    tokenizer = arg or recorded
    if tokenizer == "none":
        return None
    if tokenizer and not Path(tokenizer).exists():
        raise LladaError(
            f"tokenizer {tokenizer} (from {where} or --tokenizer) not found: "
            "pass --tokenizer PATH, or --tokenizer none to export without tokenizer files"
        )
    return tokenizer


def _adapter_from_run(args: argparse.Namespace, peft: lora.PeftConfig, base: str) -> lora.Adapter:
    tag = args.tag or latest_tag(args.run_dir)
    state = lora.adapter_state(consolidate_checkpoint(args.run_dir, tag))
    config = lora.lora_config(peft, str(Path(base).resolve()))
    saved = checkpoint_dir(args.run_dir) / str(tag) / LORA_STATE
    fingerprint = json.loads(saved.read_text()).get("base_fingerprint") if saved.is_file() else None
    return lora.Adapter(args.run_dir, config, state, config.base_model_name_or_path, fingerprint)


def _save_merged(adapter: lora.Adapter, base: str, out: Path, tokenizer: str | None) -> None:
    model = lora.load_merged(base, adapter)  # checks names, shapes and the base's fingerprint
    weights = {n: p.detach() for n, p in named_weights(model)}  # the expert biases included
    save_pretrained(weights, model.config, out, tokenizer_dir=tokenizer)
    print(f"exported {len(weights)} tensors (LoRA merged into {base}) to {out}")


def export_adapter_folder(args: argparse.Namespace) -> None:
    """``--adapter FOLDER --merge-lora``: merge an adapter folder into the base it names."""
    if not args.merge_lora:
        raise LladaError(f"--adapter {args.adapter} is already an adapter folder: add --merge-lora")
    adapter = lora.read_adapter(args.adapter)
    base = args.base or adapter.base
    if not base or not Path(base).is_dir():
        raise LladaError(f"base model {base!r} of adapter {args.adapter} not found: pass --base FOLDER")
    recorded = str(args.adapter) if (args.adapter / "tokenizer.json").is_file() else base
    _save_merged(adapter, base, args.out, _tokenizer(args.tokenizer, recorded, args.adapter))


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="training run directory")
    source.add_argument("--adapter", type=Path, help="a LoRA adapter folder (with --merge-lora)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--merge-lora", action="store_true",
                        help="LoRA: write base + merged adapters in the released layout")
    parser.add_argument("--base", default=None,
                        help="with --adapter: the base folder (default: the one the adapter names)")
    parser.add_argument(
        "--tokenizer", default=None,
        help="tokenizer.json or folder to ship with the model (default: the run's data.tokenizer; "
        "'none' for no tokenizer files)",
    )
    args = parser.parse_args(argv)
    if args.adapter is not None:
        export_adapter_folder(args)
        return
    model_cfg, recorded = run_model_config(args.run_dir)
    tokenizer = _tokenizer(args.tokenizer, recorded, args.run_dir / "config.yaml")
    peft, base = run_peft(args.run_dir)
    if peft is None:
        if args.merge_lora:
            raise LladaError(f"{args.run_dir} is not a LoRA run (peft.method=none): drop --merge-lora")
        state = consolidate_checkpoint(args.run_dir, args.tag)
        save_pretrained(state, model_cfg, args.out, tokenizer_dir=tokenizer)
        print(f"exported {len(state)} tensors to {args.out}")
        return
    adapter = _adapter_from_run(args, peft, base)
    if args.merge_lora:
        _save_merged(adapter, adapter.base, args.out, tokenizer)
    else:
        lora.save_adapter(adapter.state, adapter.config, args.out, tokenizer)
        print(f"exported the LoRA adapter ({len(adapter.state)} tensors, base {adapter.base}) "
              f"to {args.out}; add --merge-lora for a merged model")


if __name__ == "__main__":
    main()
