"""``llada-plot``: loss, learning-rate (and block-size) curves of a run, from ``metrics.jsonl`` to PNG.

    llada-plot runs/x            # writes runs/x/plots/curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llada_train.data.jsonl import iter_jsonl_rows
from llada_train.errors import LladaError, exit_on_error


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``; a resumed run's repeated steps keep their last values."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise LladaError(f"{path} not found: is {run_dir} a llada-train run directory?")
    by_step: dict[int, dict] = {}
    for _, row in iter_jsonl_rows(path):
        by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def run_seq_len(run_dir: Path) -> int | None:
    """``trainer.seq_len`` from the run's ``config.yaml`` (None when absent): the length a
    block size of 0 (the whole sequence) stands for."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        return int(yaml.safe_load(path.read_text())["trainer"]["seq_len"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


# metric namespaces of objectives (LossOutput.metrics): one panel per key
OBJECTIVE_METRICS = ("vrpo", "espo", "rl")


def plot_curves(rows: list[dict], out: Path, seq_len: int | None = None) -> Path:
    """Two panels (loss, lr) against step, saved as PNG; a third with the block size when the
    run had a block-size curriculum (its transitions are where the loss may jump; a block
    size of 0, the whole sequence, is drawn at ``seq_len`` when known).

    Validation rows (``val_loss``) are drawn on the loss panel with +-2 standard errors. An
    objective's own metrics (``vrpo/...``, ``espo/...``, ``rl/...``) get one panel each. A
    mixture-of-experts run (``moe/L{i}/...`` metrics) adds two panels: each layer's expert
    load max/mean (1 = balanced) and its largest |expert bias|.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LladaError("llada-plot needs matplotlib: pip install 'llada-train[plot]'") from exc
    steps = [r["step"] for r in rows]
    blocks = [r for r in rows if "block_size" in r]
    moe = sorted({k for r in rows for k in r if k.startswith("moe/")})
    objective = sorted({k for r in rows for k in r if k.split("/")[0] in OBJECTIVE_METRICS})
    panels = 2 + bool(blocks) + (2 if moe else 0) + len(objective)
    height = {2: 6, 3: 8}.get(panels, 2.5 * panels)
    fig, axes = plt.subplots(panels, 1, figsize=(8, height), sharex=True)
    ax_loss, ax_lr = axes[0], axes[1]
    ax_loss.plot(steps, [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        se = [2 * r.get("val_loss_se", 0.0) for r in val]
        ax_loss.errorbar([r["step"] for r in val], [r["val_loss"] for r in val], yerr=se,
                         marker="o", capsize=3, color="tab:green", label="validation ELBO (+-2 se)")
        ax_loss.legend()
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if moe:
        _plot_moe(moe, rows, axes[-2], axes[-1])
    for key, ax in zip(objective, axes[2 + bool(blocks) :], strict=False):
        have = [r for r in rows if key in r]
        ax.plot([r["step"] for r in have], [r[key] for r in have], color="tab:red")
        ax.set_ylabel(key, fontsize="small")
        ax.grid(alpha=0.3)
    if blocks:
        ax_b = axes[2]
        sizes = [r["block_size"] or seq_len or 0 for r in blocks]
        ax_b.step([r["step"] for r in blocks], sizes, where="post", color="tab:purple")
        if seq_len and min(sizes) > 0:
            ax_b.set_yscale("log", base=2)
        ax_b.set_ylabel(f"block size (L = {seq_len})" if seq_len else "block size (0 = L)")
        ax_b.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def _plot_moe(keys: list[str], rows: list[dict], ax_load, ax_bias) -> None:  # noqa: ANN001
    """One line per MoE layer: load max/mean on ``ax_load``, |expert bias| max on ``ax_bias``."""
    for key in keys:
        ax = ax_load if key.endswith("load_max_mean") else ax_bias
        have = [r for r in rows if key in r]
        ax.plot([r["step"] for r in have], [r[key] for r in have], label=key.split("/")[1])
    ax_load.set_ylabel("expert load max/mean")
    ax_bias.set_ylabel("max |expert bias|")
    for ax in (ax_load, ax_bias):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=4)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/plots/curves.png)")
    args = parser.parse_args(argv)
    out = plot_curves(read_metrics(args.run_dir), args.out or args.run_dir / "plots" / "curves.png",
                      run_seq_len(args.run_dir))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
