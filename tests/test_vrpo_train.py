"""``llada-dpo``'s ``run_dpo`` end to end: VRPO steps on the demo's chat pairs (the right answer
against another question's answer). One run of two steps serves log 2 and zero reward margins
on the first step and the logged preference metrics; a second run, resumed in another process
from that run's step-1 checkpoint, redoes step 2 exactly. So under ZeRO-2 (one process), and
under ZeRO-3 on two ranks with either reference (the frozen copy, the LoRA base); bad runs
stop with one line.

Each run is ``python -m llada_train.cli.dpo`` in its own process, as a user starts it (a
run in a fork of the test process can deadlock on a lock another thread held at the fork).
The bad runs, which stop before any process group, share one import: each is a fork of a
one-thread process from ``main()`` on (``tests/forked_launches.py``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines.preference_records import build_preference_records
from data_pipelines.sources import SourceSpec
from tests.conftest import REPO
from tests.forked_launches import forked_launches
from tests.launch_utils import branch_at, launch_env, metrics, torchrun_cmd
from tests.model_utils import save_tiny_model

pytestmark = pytest.mark.slow
STEPS = 2  # checkpoints at both; the resumed run redoes step 2 from step 1's
PREFERENCE_METRICS = (
    "vrpo/reward_margin",
    "vrpo/reward_accuracy",
    "vrpo/chosen_elbo_delta",
    "vrpo/rejected_elbo_delta",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base") / "base", n_layers=2)  # half the cost


@pytest.fixture(scope="module")
def pairs(demo_data, tmp_path_factory):
    """First turns of the demo chat: its answer is chosen, the next dialogue's is rejected."""
    rows = [json.loads(line) for line in (demo_data / "chat.jsonl").read_text().splitlines()[:65]]
    out = tmp_path_factory.mktemp("pairs")
    prefs = [
        {
            "prompt": a["messages"][0]["content"],
            "chosen": a["messages"][1]["content"],
            "rejected": b["messages"][1]["content"],
        }
        for a, b in zip(rows, rows[1:], strict=False)
    ]
    (out / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    build_preference_records(
        SourceSpec(inputs=[str(out / "p.jsonl")]), demo_data / "tokenizer.json", out / "rec"
    )
    return out / "rec"


def dpo_args(run_dir, base, pairs, demo_data, *extra: str) -> list[str]:
    """The runs' overrides; ZeRO-2 unless ``extra`` names a ``deepspeed=`` (Hydra refuses two)."""
    stage = [] if any(e.startswith("deepspeed=") for e in extra) else ["deepspeed=zero2"]
    return [
        f"run_dir={run_dir}",
        f"init_from={base}",
        f"data.path={pairs}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.seq_len=64",
        "trainer.epochs=0",
        "schedule=sft_demo",
        "schedule.peak_lr=3e-3",
        "schedule.warmup_steps=1",
        "objective.elbo_timesteps=4",
        "objective.loss_chunk_rows=64",
        *stage,
        "logging.log_every=1",
        "logging.progress_bar=false",
        "trainer.export_at_end=false",
        *extra,
    ]


def run_dpo(
    overrides: list[str], log: Path, nproc: int = 1, timeout_s: float = 300
) -> tuple[int, str]:
    """``python -m llada_train.cli.dpo overrides`` as a user runs it, or under ``torchrun`` with
    ``nproc`` > 1 ranks: (exit code, output)."""
    module = "llada_train.cli.dpo"
    cmd = (
        [sys.executable, "-m", module, *overrides]
        if nproc == 1
        else torchrun_cmd(module, overrides, nproc)
    )
    proc = subprocess.run(
        cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout_s
    )
    out = proc.stdout + proc.stderr
    log.write_text(out)
    return proc.returncode, out


def train_and_resume(data: tuple, tmp_path: Path, *extra: str, nproc: int = 1) -> None:
    """Two steps from the reference (step 1: loss log 2, zero margins), the logged preference
    metrics consistent, then step 2 again, resumed in a new launch from step 1's checkpoint:
    its loss and preference metrics must be the same."""
    full = tmp_path / "full"
    steps = f"trainer.max_steps={STEPS}"
    args = (*data, steps, *extra)
    code, out = run_dpo(dpo_args(full, *args, "trainer.save_every=1"), tmp_path / "a", nproc)
    assert code == 0, out[-3000:]
    rows = metrics(full)
    losses = [m["loss"] for m in rows]
    print(f"VRPO losses ({nproc} ranks {' '.join(extra)}): {', '.join(f'{x:.4f}' for x in losses)}")
    assert len(losses) == STEPS and abs(losses[0] - math.log(2)) < 1e-5  # policy = reference
    assert abs(losses[1] - math.log(2)) > 1e-4  # the first update moved the policy
    first, second = rows[0], rows[1]
    for m in rows:  # the margin is beta x (chosen delta - rejected delta), beta = 0.1
        assert 0.0 <= m["vrpo/reward_accuracy"] <= 1.0
        bracket = m["vrpo/chosen_elbo_delta"] - m["vrpo/rejected_elbo_delta"]
        assert m["vrpo/reward_margin"] == pytest.approx(0.1 * bracket, rel=1e-4, abs=1e-6)
    for key in ("vrpo/reward_margin", "vrpo/chosen_elbo_delta", "vrpo/rejected_elbo_delta"):
        assert abs(first[key]) < 1e-4, (key, first[key])  # at the reference: no margin
    assert abs(second["vrpo/reward_margin"]) > 1e-4
    resumed = branch_at(full, STEPS - 1, tmp_path / "resumed", with_metrics=False)
    code, out = run_dpo(dpo_args(resumed, *args), tmp_path / "b", nproc)
    assert code == 0 and "resumed from" in out, out[-3000:]
    again = metrics(resumed)
    assert [m["step"] for m in again] == [STEPS]
    for key in ("loss", *PREFERENCE_METRICS):
        assert again[0][key] == pytest.approx(second[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize(
    ("nproc", "extra"),
    [
        (1, []),  # ZeRO-2, the frozen copy
        # the frozen copy, a plain module beside the partitioned policy
        (2, ["deepspeed=zero3"]),
        # the reference is the partitioned policy itself with its adapters switched off
        (2, ["deepspeed=zero3", "peft=lora", "objective.reference=lora_base"]),
    ],
    ids=["zero2-frozen_copy", "zero3-2ranks-frozen_copy", "zero3-2ranks-lora_base"],
)
def test_vrpo_trains_from_log2_logs_its_metrics_and_resumes_exactly(
    base, pairs, demo_data, tmp_path, nproc, extra
):
    """ZeRO-3 on two ranks, not one: each rank holds half of every partitioned weight, and
    the ranks' pairs differ, so do their masked-row counts, and the partitioned head's chunk
    count must be agreed between them (``chunked_log_probs``). A step-2 loss of log 2 would
    mean the reference followed the policy (adapters left on, or the copy not frozen)."""
    train_and_resume((base, pairs, demo_data), tmp_path, *extra, nproc=nproc)


BAD_RUNS = [  # (overrides, the text of the error line)
    (
        ["objective.reference=lora_base"],
        "objective.reference=lora_base is the LoRA base with the adapters off: set peft=lora",
    ),
    (["objective=sft"], "llada-dpo trains objective=vrpo, not sft"),
    (["init_from=null"], "llada-dpo needs init_from=<model folder>"),
]


@pytest.fixture(scope="module")
def bad_runs(base, pairs, demo_data, tmp_path_factory):
    """Each of BAD_RUNS from ``main()`` on in its own process, all after one import
    (``forked_launches``): (run folder, exit code, output) per case."""
    tmp = tmp_path_factory.mktemp("bad")
    run_dirs = [tmp / f"r{i}" for i in range(len(BAD_RUNS))]
    cases = [{"argv": dpo_args(d, base, pairs, demo_data, *extra)}
             for d, (extra, _) in zip(run_dirs, BAD_RUNS, strict=True)]  # fmt: skip
    results = forked_launches("llada_train.cli.dpo", cases, tmp / "logs", preload=())
    return [(d, code, out) for d, (code, out) in zip(run_dirs, results, strict=True)]


@pytest.mark.parametrize(("case", "message"), [(i, m) for i, (_, m) in enumerate(BAD_RUNS)],
                         ids=[" ".join(e) for e, _ in BAD_RUNS])  # fmt: skip
def test_bad_dpo_runs_are_one_line(bad_runs, case, message):
    """A bad config: one ``error:`` line and exit code 2, before any process group."""
    run_dir, code, out = bad_runs[case]
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], out[-2000:]
    assert not (run_dir / "config.yaml").exists()  # stopped before writing the run
