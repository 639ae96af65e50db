"""``llada-export``: consolidate a checkpoint of any ZeRO stage into the released layout.

    llada-export --run-dir runs/x [--tag step_00001000] --out runs/x/export_1000

Runs in one process on CPU, so a job killed before its own end-of-run export still yields
a model for SFT or the samplers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from llada_train.errors import LladaError, exit_on_error
from llada_train.model.checkpoint import save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.train.build import resolve_model_config
from llada_train.train.checkpointing import consolidate_checkpoint


def run_model_config(run_dir: Path) -> tuple[ModelConfig, str | None]:
    """The model config and tokenizer path recorded in a run's ``config.yaml``."""
    path = run_dir / "config.yaml"
    if not path.exists():
        raise LladaError(f"{path} not found: is {run_dir} a llada-train run directory?")
    cfg = OmegaConf.load(path)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    return resolve_model_config(model_cfg, cfg.get("init_from")), cfg.data.get("tokenizer")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="training run directory")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (released layout)")
    args = parser.parse_args(argv)
    model_cfg, tokenizer = run_model_config(args.run_dir)
    state = consolidate_checkpoint(args.run_dir, args.tag)
    save_pretrained(state, model_cfg, args.out, tokenizer_dir=tokenizer)
    print(f"exported {len(state)} tensors to {args.out}")


if __name__ == "__main__":
    main()
