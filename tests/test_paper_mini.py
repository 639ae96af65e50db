"""``benchmarks/paper_mini.py``: the poem corpus (fast), and a ``--quick`` smoke run of both
parts that checks its tables, JSON and plots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.paper_mini_data import (
    BOS,
    LINE_LENGTH,
    MASK,
    POEM_ROW,
    couplet_infill_rows,
    load_shakespeare,
    make_poems,
    poem_queries,
    poem_rows,
)
from tests.conftest import REPO


def test_poem_corpus(shared_data: Path) -> None:
    """Held-out poems appear in training only as the couplet; queries and infill rows match it."""
    data = shared_data / "tinyshakespeare" / "input.txt"
    if not data.is_file():
        pytest.skip(f"{data} not present")
    _, vocab = load_shakespeare(data)
    poems = make_poems(5, seed=3)
    lines = [line for p in poems for line in (p.first, p.second)]
    assert len(set(lines)) == 20 and all(len(line) == LINE_LENGTH for line in lines)
    assert sum(p.taught for p in poems) == 5
    rows = poem_rows(poems, vocab)
    assert rows.shape == (5 * 3 + 5, POEM_ROW) and bool((rows[:, 0] == BOS).all())
    texts = {vocab.decode(r[1:].tolist()) for r in rows}
    for p in poems:
        if p.taught:
            continue
        # the reverse prompt never occurs for a held-out poem: only its couplet was seen
        assert not any(t.startswith(f"{p.second} <") or t.startswith(f"{p.first} >") for t in texts)
        assert any(t.startswith(f"{p.first} / {p.second}.") for t in texts)
    held = [p for p in poems if not p.taught]
    for form, answers in (
        ("couplet", [p.second for p in held]),
        ("next", [p.second for p in held]),
        ("previous", [p.first for p in held]),
    ):
        queries = poem_queries(poems, form)
        assert [a for _, a in queries] == answers
        assert len({len(q) for q, _ in queries}) == 1  # one batch per form
    masked, firsts = couplet_infill_rows(poems, vocab)
    assert firsts == [p.first for p in held]
    assert (masked == MASK).sum(1).tolist() == [LINE_LENGTH] * len(held)
    for row, p in zip(masked, held, strict=True):
        assert (
            vocab.decode(row[1 + LINE_LENGTH : 1 + LINE_LENGTH + 3 + LINE_LENGTH].tolist())
            == f" / {p.second}"
        )


@pytest.mark.slow
@pytest.mark.isa
def test_paper_mini_quick(shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "tinyshakespeare" / "input.txt"
    if not data.is_file():
        pytest.skip(f"{data} not present")
    out = tmp_path / "pm"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "paper_mini.py"),
            "--quick",
            "--out",
            str(out),
            "--data",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in (
        "likelihood.png",
        "reversal.png",
        "speed.png",
        "block_likelihood.png",
        "poems.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    tables = (out / "tables.md").read_text()
    assert tables in proc.stdout  # the printed tables are the written ones
    # every table row has numbers that parse: bits/char, accuracies with a CI, NFE
    bpc = re.findall(
        r"^\| [SM] \| [\d,]+ \| [\d.e+]+ \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \|", tables, re.M
    )
    assert len(bpc) == 2
    for diffusion, ar, gap in bpc:
        assert 0 < float(ar) < 10 and 0 < float(diffusion) < 10
        assert float(gap) == pytest.approx(float(diffusion) - float(ar), abs=2e-3)
    accs = re.findall(r"(\d+\.\d) \+- (\d+\.\d)", tables)
    # reversal: diffusion 4 cells, AR 3; speed: 5 methods; poems: 3 rows (the last part 1's)
    assert len(accs) == 4 + 3 + 5 + (6 + 5 + 4)
    assert all(0 <= float(m) <= 100 for m, _ in accs)
    res = json.loads((out / "results.json").read_text())
    rev = res["reversal"]
    assert len(rev["per_seed"]) >= 3 and rev["facts"] > 0
    for seed in rev["per_seed"]:
        for kind in ("diffusion", "ar"):
            assert 0 <= seed[kind]["forward"] <= 1 and 0 <= seed[kind]["reversed"] <= 1
            for acc, nfe in seed[kind]["speed"].values():
                assert 0 <= acc <= 1 and 1 <= nfe <= 32  # at most one pass per decoded token
    # part 2: the ladder's six rows, a bound never below zero, exact estimates with no spread
    ladder = re.findall(
        r"^\| (AR|BD\(\d+\)|MDLM) \| [^|]+ \| [\d.e+]+ \| ([\d.]+) \| ([\d.]+) \|$", tables, re.M
    )
    assert [m for m, _, _ in ladder] == ["AR", "BD(1)", "BD(4)", "BD(8)", "BD(16)", "MDLM"]
    spread = {m: float(s) for m, _, s in ladder}
    assert all(0 < float(b) < 10 for _, b, _ in ladder)
    assert spread["AR"] == 0 and spread["BD(1)"] == 0  # exact: one token per block
    assert all(spread[m] > 0 for m in ("BD(4)", "BD(8)", "BD(16)", "MDLM"))  # Monte Carlo
    assert "ordering at 40 steps: AR " in tables
    poems = res["poems"]
    assert len(poems["per_seed"]) == 2
    for seed in poems["per_seed"]:
        assert seed["ar"]["couplet_infill"] is None  # no right context for the AR twin
        for kind in ("diffusion", "block", "ar"):
            cells = [seed[kind][k] for k in ("next", "previous", "couplet", "couplet_infill")]
            assert all(v is None or 0 <= v <= 1 for v in cells)
    # wall time (res["seconds"], ~70 s for both parts on the shared 2 cores) is reported, never asserted
    assert res["seconds"] > 0
