"""benchmarks/gpu_bench.py --smoke: the GPU benchmark's code path at tiny shapes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_gpu_bench_smoke_writes_every_row(tmp_path):
    # -X importtime lists every module imported: the bench must not pull in the heavy stack
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "benchmarks" / "gpu_bench.py"), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    assert not {m for m in imported if m.split(".")[0] in ("deepspeed", "hydra", "omegaconf")}
    table = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == table["meta"]["planned"] and len(rows) == 15
    markdown = (tmp_path / "gpu_bench.md").read_text()
    for name, row in rows.items():
        assert f"| {name} |" in markdown
        assert row["status"] == "ok" or row["status"].startswith("error: "), row  # never missing
    for name in ("1b new eager", "1b old-loss eager", "1b new compiled", "8b4 new eager", "8b4 old-loss eager",
                 "1b block32 dense-mask eager", "1b block32 flex eager"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["tokens_per_s"] > 0 and "mfu" not in rows[name]  # no MFU on CPU
    # same init, same draws: the two loss paths start from the same loss (fp32)
    for model in ("1b", "8b4"):
        new, old = rows[f"{model} new eager"]["loss_step1"], rows[f"{model} old-loss eager"]["loss_step1"]
        assert new == pytest.approx(old, rel=1e-5)
    # block rows: the 2L input's honest FLOPs (body twice, head once, allowed attention scores)
    block, full = rows["1b block32 dense-mask eager"], rows["1b new eager"]
    assert block["block"] == 8 and full["flops_per_token"] < block["flops_per_token"] < 2 * full["flops_per_token"]
    assert block["loss_step1"] > 0


def test_moe_bench_smoke_prints_every_row():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "moe_bench.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert rows[0].startswith("| dense |") and rows[0].endswith("| 1.00x |")
    assert any(r.startswith("| moe loop |") for r in rows)
