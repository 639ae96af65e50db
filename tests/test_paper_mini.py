"""Smoke test of ``benchmarks/paper_mini.py --quick``: it runs, writes its tables and plots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.isa
def test_paper_mini_quick(shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "tinyshakespeare" / "input.txt"
    if not data.is_file():
        pytest.skip(f"{data} not present")
    out = tmp_path / "pm"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "paper_mini.py"), "--quick", "--out", str(out),
         "--data", str(data)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("likelihood.png", "reversal.png", "speed.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    tables = (out / "tables.md").read_text()
    assert tables in proc.stdout  # the printed tables are the written ones
    # every table row has numbers that parse: bits/char, accuracies with a CI, NFE
    bpc = re.findall(r"^\| [SM] \| [\d,]+ \| [\d.e+]+ \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \|", tables, re.M)
    assert len(bpc) == 2
    for diffusion, ar, gap in bpc:
        assert 0 < float(ar) < 10 and 0 < float(diffusion) < 10
        assert float(gap) == pytest.approx(float(diffusion) - float(ar), abs=2e-3)
    accs = re.findall(r"(\d+\.\d) \+- (\d+\.\d)", tables)
    assert len(accs) == 4 + 3 + 5  # reversal: diffusion 4 cells, AR 3; speed: 5 methods
    assert all(0 <= float(m) <= 100 for m, _ in accs)
    res = json.loads((out / "results.json").read_text())
    rev = res["reversal"]
    assert len(rev["per_seed"]) >= 3 and rev["facts"] > 0
    for seed in rev["per_seed"]:
        for kind in ("diffusion", "ar"):
            assert 0 <= seed[kind]["forward"] <= 1 and 0 <= seed[kind]["reversed"] <= 1
            for acc, nfe in seed[kind]["speed"].values():
                assert 0 <= acc <= 1 and 1 <= nfe <= 32  # at most one pass per decoded token
    # wall time (res["seconds"], ~35 s on 2 idle cores) is reported, never asserted
    assert res["seconds"] > 0
