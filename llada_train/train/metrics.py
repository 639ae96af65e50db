"""Metrics to stdout, ``metrics.jsonl`` and wandb; throughput and MFU arithmetic."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

SECRET_MARKERS = ("key", "token", "secret", "password")


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12·layers·d·L for attention scores."""
    return 6.0 * n_params + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def scrub_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """Drop any config entry whose name looks like a credential before it is logged."""
    clean: dict[str, Any] = {}
    for k, v in config.items():
        if any(m in k.lower() for m in SECRET_MARKERS) and not k.endswith("_id"):
            continue
        clean[k] = scrub_secrets(v) if isinstance(v, dict) else v
    return clean


class MetricsLogger:
    """Rank 0 writes one JSON line per logged step and mirrors it to stdout and wandb."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        wandb_mode: str = "disabled",
        wandb_project: str = "llada-train",
        wandb_entity: str | None = None,
        wandb_run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        if wandb_mode not in ("disabled", "offline", "online"):
            raise LladaError(f"logging.wandb_mode={wandb_mode!r}; use disabled, offline or online")
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))  # keep wandb files in the run dir
            self._wandb = wandb.init(
                project=wandb_project,
                entity=wandb_entity,
                name=wandb_run_name or Path(run_dir).name,
                mode=wandb_mode,
                config=scrub_secrets(config or {}),
                dir=str(run_dir),
                resume="allow",
                id=_wandb_id(Path(run_dir)),
            )

    def log(self, step: int, metrics: dict[str, float], echo: bool = True) -> None:
        """Append one record; ``echo`` also prints a compact line."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if echo:
            print(format_metrics(step, metrics), flush=True)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def format_metrics(step: int, m: dict[str, float]) -> str:
    """One stdout line: ``step 10 | loss 5.1234 | lr 4.00e-04 | ...``."""
    parts = [f"step {step}"]
    for k, v in m.items():
        if k == "lr":
            parts.append(f"lr {v:.2e}")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{k} {v:.2e}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id stored in the run dir, so a resumed job continues the same run."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
