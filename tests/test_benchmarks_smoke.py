"""benchmarks/gpu_bench.py --smoke: the GPU benchmark's code path at tiny shapes on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_gpu_bench_smoke_writes_every_row(tmp_path, monkeypatch):
    # -X importtime lists every module imported: the bench must not pull in the heavy stack
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(REPO / "benchmarks" / "gpu_bench.py"),
            "--smoke",
            "--steps",  # one timed step after the first and a warm-up: the wiring, not timings
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line
    }
    assert not {m for m in imported if m.split(".")[0] in ("deepspeed", "hydra", "omegaconf")}
    table = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == table["meta"]["planned"] and len(rows) == 17
    markdown = (tmp_path / "gpu_bench.md").read_text()
    for name, row in rows.items():
        assert f"| {name} |" in markdown
        assert row["status"] == "ok" or row["status"].startswith("error: "), row  # never missing
    for name in (
        "1b new eager",
        "1b old-loss eager",
        "1b new compiled",
        "8b4 new eager",
        "8b4 old-loss eager",
        "1b block32 dense-mask eager",
        "1b block32 flex eager",
    ):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["tokens_per_s"] > 0 and "mfu" not in rows[name]  # no MFU on CPU
    # same init, same draws: the two loss paths start from the same loss (fp32)
    for model in ("1b", "8b4"):
        new, old = (
            rows[f"{model} new eager"]["loss_step1"],
            rows[f"{model} old-loss eager"]["loss_step1"],
        )
        assert new == pytest.approx(old, rel=1e-5)
    # block rows: the 2L input's honest FLOPs (body twice, head once, allowed attention scores)
    block, full = rows["1b block32 dense-mask eager"], rows["1b new eager"]
    assert (
        block["block"] == 8
        and full["flops_per_token"] < block["flops_per_token"] < 2 * full["flops_per_token"]
    )
    assert block["loss_step1"] > 0
    # MoE rows (the LLaDA2.0-mini 4-layer slice's stand-in): the loop kernel runs on any build,
    # grouped_mm where torch._grouped_mm does (else an error row); MFU on ACTIVE FLOPs, by hand:
    # 4 x (attention 64 x 16 x (8 + 4) + norms 2 x 64 + 2 x 16) + dense layer 3 x 64 x 160
    # + 3 x (shared 3 x 64 x 16 + router 64 x 8 + top-2 experts 2 x 3 x 64 x 16) + head 64 + 64 x 1000
    active = (
        4 * (64 * 16 * 12 + 2 * 64 + 2 * 16)
        + 3 * 64 * 160
        + 3 * (3 * 64 * 16 + 64 * 8 + 2 * 3 * 64 * 16)
        + 64
        + 64_000
    )
    loop, grouped = rows["mini4 moe=loop eager"], rows["mini4 moe=grouped_mm eager"]
    assert loop["status"] == "ok", loop
    assert f"| mini4 moe=loop eager | ok | {loop['tokens_per_s']:,.0f} |" in markdown
    for row in (loop, grouped):
        if row["status"] == "ok":
            assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and "mfu" not in row
            assert row["flops_per_token"] == pytest.approx(6 * active + 12 * 4 * 64 * 64, rel=1e-9)
            assert "expert_load_max_mean" in row  # routing ran and its load was counted
    assert "expert_load_max_mean" not in rows["1b new eager"]  # dense rows route nothing
    if grouped["status"] == "ok":  # same init, same draws: the two kernels start from one loss
        assert grouped["loss_step1"] == pytest.approx(loop["loss_step1"], rel=1e-4)
    # the full-size rows use LLaDA2.0-mini's published shape, as scripts/memory_plan.py has it
    shapes = {}
    for name in ("gpu_bench", "memory_plan"):
        folder = "benchmarks" if name == "gpu_bench" else "scripts"
        spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
        shapes[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, shapes[name])  # dataclasses look their module up
        spec.loader.exec_module(shapes[name])
    published = shapes["memory_plan"].MOE_MODELS["LLaDA2.0-mini"]
    sliced = shapes["gpu_bench"].LLADA2_MINI_4
    assert {k: sliced[k] for k in published} == dict(published, n_layers=4)


def test_moe_bench_smoke_prints_every_row(capsys, monkeypatch):
    """``main`` of benchmarks/moe_bench.py called here (one process, torch alone, as its own
    launch is): its --smoke table printed with every row."""
    spec = importlib.util.spec_from_file_location("moe_bench", REPO / "benchmarks" / "moe_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repo first on it
    spec.loader.exec_module(bench)
    per_step = bench.main(["--smoke"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert rows[0].startswith("| dense |") and rows[0].endswith("| 1.00x |")
    assert any(r.startswith("| moe loop |") for r in rows)
    assert len(rows) == len(per_step) and all(s > 0 for s in per_step.values())


@pytest.mark.slow
def test_post_train_quick_runs_every_arm_and_writes_the_table(tmp_path):
    """benchmarks/post_train.py --quick: held-out questions, pairs, the three arms' runs, the
    bootstrap table (an untrained model: the numbers are not the point, the wiring is)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "post_train.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled"),
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "post_train.json").read_text())
    assert set(result["arms"]) == {"sft", "vrpo", "espo"}
    for arm, r in result["arms"].items():
        assert 0.0 <= r["lo"] <= r["acc"] <= r["hi"] <= 1.0 and r["wall_s"] > 0, arm
    assert len(result["arms"]["espo"]["reward_curve"]) == 2  # one value per update
    table = (tmp_path / "post_train.md").read_text()
    assert all(f"| {arm} |" in table for arm in ("sft", "vrpo", "espo"))
    for arm in ("sft", "vrpo", "espo"):  # each arm trained and exported its model
        assert (tmp_path / arm / "seed_0" / "export" / "config.json").is_file()
