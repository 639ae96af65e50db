"""``llada-plot``: loss and learning-rate curves of a run, from ``metrics.jsonl`` to PNG.

    llada-plot runs/x            # writes runs/x/plots/curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llada_train.data.jsonl import iter_jsonl_rows
from llada_train.errors import LladaError, exit_on_error


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``; a resumed run's repeated steps keep their last value."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise LladaError(f"{path} not found: is {run_dir} a llada-train run directory?")
    by_step = {row["step"]: row for _, row in iter_jsonl_rows(path)}
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(rows: list[dict], out: Path) -> Path:
    """Two panels (loss, lr) against step, saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LladaError("llada-plot needs matplotlib: pip install 'llada-train[plot]'") from exc
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in rows])
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/plots/curves.png)")
    args = parser.parse_args(argv)
    out = plot_curves(read_metrics(args.run_dir), args.out or args.run_dir / "plots" / "curves.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
