"""How far the golden loss curves move across CPU instruction sets on this machine.

    python scripts/golden_spread.py [--out runs/golden_spread]

Runs the two fixed golden runs of ``tests/test_golden_losses.py`` once per kernel setting
(``ATEN_CPU_CAPABILITY`` = default, avx2, avx512, the native path, and MKL/oneDNN limited to
AVX2) and prints, per step, the largest relative difference from the native run, then the
same for the mean of each curve's loosely-checked tail. The test's tolerances come from
this table (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.demo import prepare_demo  # noqa: E402
from tests.launch_utils import cli, metrics  # noqa: E402
from tests.test_golden_losses import RUNS, STEPS, TIGHT_STEPS  # noqa: E402

SETTINGS = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def golden_losses(out: Path, data: Path, env: dict[str, str]) -> dict[str, list[float]]:
    """The two golden curves under ``env`` (set for the child processes only)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cli("llada-pretrain", [f"run_dir={out / 'pretrain'}", f"data.path={data / 'shards'}",
                               f"data.tokenizer={data / 'tokenizer.json'}", *RUNS["pretrain"]])
        cli("llada-sft", [f"run_dir={out / 'sft'}", f"init_from={out / 'pretrain' / 'export'}",
                          f"data.path={data / 'sft'}", f"data.tokenizer={data / 'tokenizer.json'}",
                          *RUNS["sft"]])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {name: [m["loss"] for m in metrics(out / name)] for name in RUNS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "golden_spread")
    args = ap.parse_args()
    data = args.out / "data"
    prepare_demo(data)
    curves = {}
    for name, env in SETTINGS.items():
        cache = args.out / f"{name}.json"
        if not cache.exists():  # resumable: a finished setting is not rerun
            cache.write_text(json.dumps(golden_losses(args.out / name, data, env)))
        curves[name] = json.loads(cache.read_text())
        print(f"ran {name}", flush=True)
    ref = curves["native"]
    others = [n for n in SETTINGS if n != "native"]
    for run in RUNS:
        print(f"\n{run}: relative difference from the native path")
        print(f"{'step':>5} " + " ".join(f"{n:>9}" for n in others) + f" {'max':>9}")
        for i in range(STEPS):
            diffs = [abs(curves[n][run][i] - ref[run][i]) / abs(ref[run][i]) for n in others]
            print(f"{i + 1:>5} " + " ".join(f"{d:>9.1e}" for d in diffs) + f" {max(diffs):>9.1e}")
        tight = TIGHT_STEPS[run]
        if tight < STEPS:
            tail = [abs(sum(curves[n][run][tight:]) / sum(ref[run][tight:]) - 1) for n in others]
            print(f"mean of steps {tight + 1}-{STEPS}: largest relative difference {max(tail):.1e}")


if __name__ == "__main__":
    main()
