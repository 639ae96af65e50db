"""benchmarks/sample_bench.py --smoke: every table, the block-decoding speed rows included."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_sample_bench_smoke_prints_the_block_speed_table():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sample_bench.py"), "--smoke"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| low-confidence, 1 token/step (steps=32)" in out
    assert "| block twin (block 8) + cache, 1 token/step" in out  # trained with objective=block
    assert "| block twin (block 8) + cache, threshold 0.9" in out
    assert "block decoding speed: 2 prompts in one batch, gen_length=32" in out
    for row in ("block 8 + exact KV cache", "block 8, no cache", "block 8 + cache, stop at EOS",
                "full-diffusion low-confidence (semi-AR 8, steps=32)"):
        assert f"| {row}" in out, row
