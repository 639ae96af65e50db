"""Metrics to stdout, ``metrics.jsonl`` and wandb; throughput and MFU arithmetic."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

# Config key names that hold credentials, matched whole (case-insensitive): a substring test
# would also drop ``schedule.total_tokens`` or ``data.tokenizer``.
SECRET_NAMES = frozenset({
    "api_key", "apikey", "key", "secret", "secret_key", "client_secret", "password", "passwd",
    "token", "access_token", "auth_token", "bearer_token", "refresh_token", "private_key",
    "wandb_api_key", "wandb_key", "hf_token", "huggingface_token", "hub_token", "github_token",
})


@dataclass
class LoggingConfig:
    """Where metrics go: stdout and ``metrics.jsonl`` always, wandb per ``wandb_mode``."""

    log_every: int = 10
    wandb_mode: str = "disabled"  # "disabled", "offline" or "online"
    wandb_project: str = "llada-train"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    progress_bar: bool = True


def non_embedding_parameters(cfg: ModelConfig, active: bool = False) -> int:
    """Parameters that take part in matmuls: all but the embedding table (a lookup).

    The output head is a matmul and counts; norm weights count too (as in torchtitan). In a
    mixture-of-experts layer the MLP is the shared expert (if any), the router and the routed
    experts: all of them, or with ``active`` the top-k a token runs through (the expert
    biases, which no matmul reads, are left out).
    """
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # q, k, v, out
    norms = 2 * d + (2 * hd if cfg.qk_norm else 0)
    total = 0
    for layer in range(cfg.n_layers):
        mlp = 3 * d * cfg.ffn_width(layer)  # the dense MLP, or a MoE layer's shared expert
        if cfg.is_moe_layer(layer):
            experts = cfg.num_experts_per_tok if active else cfg.num_experts
            mlp += d * cfg.num_experts + experts * 3 * d * cfg.moe_intermediate_size
        total += attn + mlp + norms
    return total + d + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, the torchtitan / OLMo-core convention:
    6 x non-embedding parameters + 12 x layers x d_model x seq_len (attention scores); a
    mixture of experts counts the parameters a token is routed through (``active``)."""
    active = non_embedding_parameters(cfg, active=True)
    return 6.0 * active + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def is_secret_name(key: str) -> bool:
    """True for a credential's key name (``api_key``, ``hf_token``, ``password`` ...)."""
    return key.lower() in SECRET_NAMES


def scrub_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """Drop the config entries named like credentials (at any depth) before they are logged."""
    clean: dict[str, Any] = {}
    for k, v in config.items():
        if is_secret_name(str(k)):
            continue
        clean[k] = scrub_secrets(v) if isinstance(v, dict) else v
    return clean


class ThroughputMeter:
    """Tokens/s, samples/s, step time and (on CUDA only) MFU over the window since the last report.

    ``flops_per_token`` None turns MFU off: on CPU the figure means nothing, so it is neither
    printed nor logged. MFU = tokens/s x FLOPs per token / (peak FLOPs x devices).
    """

    def __init__(
        self,
        global_batch_size: int,
        world_size: int,
        flops_per_token: float | None = None,
        peak_flops_per_device: float = 989e12,
    ) -> None:
        self.global_batch_size, self.world_size = global_batch_size, world_size
        self.flops_per_token, self.peak = flops_per_token, peak_flops_per_device
        self.restart(0, 0.0)

    def restart(self, step: int, tokens: float, now: float | None = None) -> None:
        """Open a new window at ``step`` with ``tokens`` seen so far."""
        self._t0 = time.perf_counter() if now is None else now
        self._step0, self._tokens0 = step, tokens

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent outside training (validation) out of the current window."""
        self._t0 += seconds

    def report(self, step: int, tokens: float) -> dict[str, float]:
        """Rates over the window ending now at ``step`` / ``tokens``; opens the next window."""
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        steps = max(1, step - self._step0)
        tok_s = (tokens - self._tokens0) / dt
        out = {
            "tokens_per_s": tok_s,
            "samples_per_s": (step - self._step0) * self.global_batch_size / dt,
            "step_time_s": dt / steps,
        }
        if self.flops_per_token is not None:
            out["mfu"] = tok_s * self.flops_per_token / (self.peak * self.world_size)
        self.restart(step, tokens, now)
        return out


class MetricsLogger:
    """Rank 0 writes one JSON line per logged step and mirrors it to stdout and wandb."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        cfg: LoggingConfig | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        cfg = cfg or LoggingConfig()
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        if cfg.wandb_mode not in ("disabled", "offline", "online"):
            raise LladaError(f"logging.wandb_mode={cfg.wandb_mode!r}; use disabled, offline or online")
        if cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))  # keep wandb files in the run dir
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=cfg.wandb_run_name or Path(run_dir).name,
                mode=cfg.wandb_mode,
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
