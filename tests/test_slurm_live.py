"""launch/slurm/*.sbatch on a live single-node SLURM (munged + slurmctld + slurmd, started by
scripts/local_slurm.py under a temp dir and stopped by pid at the end).

Every job is submitted as a user submits it (``sbatch launch/slurm/pretrain.sbatch ...`` from
the repository root, with GPUS_PER_NODE / LLADA_DEVICE / LLADA_PYTHON exported), 2 CPU ranks
of the tiny model on the demo data. What these tests drive from outside is only what a
scheduler or an operator does: time limits, ``scancel``, resubmission.

Two SLURM behaviours the tests work with (Slurm 22.05):
- A requeued job waits on a begin time about 120 s ahead (``Reason=BeginTime``);
  ``scontrol update JobId=N StartTime=now`` releases it at once.
- The ``--signal=B:USR1@N`` warning is sent by slurmctld's periodic time-limit check, so it
  can come some seconds before or after the asked time; the test shortens the time limit
  with ``scontrol update`` once training runs, so the warning never lands in start-up.

Skipped (with the apt-get line) where the Debian packages are absent or not root; CI sets
LLADA_REQUIRE_SLURM=1 after installing them, so there these tests fail rather than skip.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.launch_utils import metrics
from tests.slurm_client import (
    Slurm,
    cut_time_limit,
    output_tail,
    paused,
    release_requeued,
    training_ranks,
    wait_for_warning,
)

_spec = importlib.util.spec_from_file_location("local_slurm", REPO / "scripts" / "local_slurm.py")
local_slurm = importlib.util.module_from_spec(_spec)
sys.modules["local_slurm"] = local_slurm  # dataclasses look their module up
_spec.loader.exec_module(local_slurm)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm_live")]

STEPS = 150  # the ranks are paused while a warning is on its way (cut_time_limit)
SFT_STEPS = 60
PRETRAIN = [
    "trainer.seq_len=16",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=1",
    "logging.log_every=1",
    "logging.progress_bar=false",
    f"trainer.max_steps={STEPS}",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A live one-node cluster for this module; its daemons are gone afterwards."""
    missing = local_slurm.missing_programs()
    why = (
        f"live SLURM needs {', '.join(missing)} (apt-get install -y {local_slurm.PACKAGES})"
        if missing
        else "live SLURM needs root"
        if os.geteuid() != 0
        else None
    )
    if why:
        if os.environ.get("LLADA_REQUIRE_SLURM") == "1":
            pytest.fail(f"{why}, and LLADA_REQUIRE_SLURM=1")
        pytest.skip(why)
    base = Path(f"/tmp/llada-slurm-{os.getpid()}")  # short: munge's socket path is limited
    subprocess.run(["rm", "-rf", str(base)], check=True)
    c = local_slurm.start(base, cpus=2)
    yield c
    c.stop()
    alive = [name for name, pid in c.pids.items() if local_slurm._alive(pid)]
    subprocess.run(["rm", "-rf", str(base)], check=False)
    assert not alive, f"daemons left running: {alive}"


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory):
    return Slurm(cluster, tmp_path_factory.mktemp("jobs"))


def pretrain(demo_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={demo_data / 'shards'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}",
        *PRETRAIN,
        *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def run_info_jobs(run_dir: Path) -> list[str | None]:
    import json

    return [
        json.loads(line).get("slurm_job_id")
        for line in (run_dir / "run_info.jsonl").read_text().splitlines()
    ]


# ---- the uninterrupted reference, a twin refused on its run_dir, time-limit pre-emption -----
@pytest.fixture(scope="module")
def pretrain_jobs(slurm, demo_data, tmp_path_factory):
    """Two pretraining jobs side by side (1 CPU each; each runs at half speed, so the
    pre-emption window holds fewer steps): an uninterrupted reference, and a job pre-empted
    by its time limit that requeues itself. While the reference runs, a twin is submitted
    on its run_dir and must stop at the run_dir lock."""
    root = tmp_path_factory.mktemp("pretrain")
    ref_dir, pre_dir = root / "reference", root / "preempted"
    ref, ref_out = slurm.submit(
        "pretrain.sbatch", pretrain(demo_data, ref_dir), "--time=10", name="reference"
    )
    pre, pre_out = slurm.submit(
        "pretrain.sbatch",
        pretrain(demo_data, pre_dir),
        "--time=10",
        "--signal=B:USR1@90",
        name="preempted",
    )
    slurm.wait_steps(ref, ref_dir, ref_out, 2)
    slurm.wait_steps(pre, pre_dir, pre_out, 2)
    # both paused: the reference stays alive (and holds its lock) while its twin runs, and the
    # pre-empted job waits for its warning
    with paused(training_ranks(ref_dir) + training_ranks(pre_dir)):
        twin, twin_out = slurm.submit(
            "pretrain.sbatch", pretrain(demo_data, ref_dir), "--time=10", name="twin"
        )
        cut_time_limit(slurm, pre)  # its warning is on its way while the twin runs
        twin_info = slurm.wait_state(twin, {"COMPLETED", "FAILED"}, twin_out)
        wait_for_warning(pre_out)
    release_requeued(slurm, pre, pre_dir, pre_out)
    ref_info = slurm.wait_state(ref, {"COMPLETED", "FAILED"}, ref_out)
    assert ref_info["JobState"] == "COMPLETED", output_tail(ref_out)
    pre_info = slurm.wait_state(pre, {"COMPLETED", "FAILED"}, pre_out)
    return {
        "reference": (ref, ref_dir),
        "losses": losses(ref_dir),
        "twin": (twin, twin_info, twin_out),
        "preempted": (pre, pre_info, pre_out, pre_dir),
    }


def test_second_job_on_a_live_run_dir_stops_with_one_line(pretrain_jobs, slurm):
    holder, run_dir = pretrain_jobs["reference"]
    twin, info, out = pretrain_jobs["twin"]
    text = out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert f"run_dir {run_dir} is in use by SLURM job {holder} (host " in errors[0]
    assert "Traceback" not in text
    assert slurm.runs_of(twin) == ["FAILED"]  # not requeued
    assert sorted(pretrain_jobs["losses"]) == list(range(1, STEPS + 1))  # the holder ran on
    assert run_info_jobs(run_dir) == [holder]  # the twin wrote nothing into the run_dir


# ---- 1. time-limit pre-emption: checkpoint, requeue, resume, finish -------------------------
def test_time_limit_preemption_requeues_and_resumes_exactly(pretrain_jobs, slurm):
    jid, info, out, run_dir = pretrain_jobs["preempted"]
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", f"{info['JobState']}:\n{output_tail(out)}"
    step = preemption_step(text)
    assert 2 <= step < STEPS
    # in order (lines of different processes may swap a little in the shared output file)
    events = [
        f"llada slurm job {jid} (start 1)",
        "llada: SIGUSR1 received by the batch script",
        f"requeueing job {jid}",
        f"llada slurm job {jid} (start 2)",
        f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}",
        f"exported model (safetensors + config.json) to {run_dir / 'export'}",
    ]
    positions = [text.find(e) for e in events]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (
        events,
        positions,
        text[-4000:],
    )
    saved = text.find(f"checkpoint saved: {run_dir / 'checkpoints' / f'step_{step:08d}'}")
    assert 0 <= saved < positions[3]
    assert run_info_jobs(run_dir) == [jid, jid]  # two starts of one job
    assert slurm.runs_of(jid) == ["PENDING", "COMPLETED"]  # the requeue, then the finish
    # bitwise on CPU: every loss after the resume equals the uninterrupted run's
    assert losses(run_dir) == pretrain_jobs["losses"]


# ---- the second wave: five jobs side by side ------------------------------------------------
@pytest.fixture(scope="module")
def second_wave(slurm, demo_data, pretrain_jobs, tmp_path_factory):
    """SFT from the reference's export (pre-empted by its time limit), and beside it four
    pretraining jobs that end otherwise: ``scancel --batch --signal=TERM``, ``scancel``,
    SIGKILL of every process (then a resubmission), and a data path that does not exist."""
    root = tmp_path_factory.mktemp("wave2")
    dirs = {name: root / name for name in ("sft", "term", "scancel", "killed", "bad")}
    sft_args = [
        f"run_dir={dirs['sft']}",
        f"init_from={pretrain_jobs['reference'][1] / 'export'}",
        f"data.path={demo_data / 'sft'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}",
        "schedule=sft_demo",
        "trainer.epochs=0",
        f"trainer.max_steps={SFT_STEPS}",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=1",
        "trainer.seq_len=64",
        "logging.log_every=1",
        "logging.progress_bar=false",
    ]
    # runs that end by a signal: long enough never to end first
    endless = "trainer.max_steps=100000"
    killed_args = pretrain(demo_data, dirs["killed"], "trainer.save_every=5", endless)
    bad_args = pretrain(demo_data, dirs["bad"])
    bad_args[1] = f"data.path={root / 'no_such_shards'}"
    jobs = {
        "sft": slurm.submit("sft.sbatch", sft_args, "--time=10", "--signal=B:USR1@90", name="sft"),
        "term": slurm.submit(
            "pretrain.sbatch", pretrain(demo_data, dirs["term"], endless), "--time=10", name="term"
        ),
        "scancel": slurm.submit(
            "pretrain.sbatch",
            pretrain(demo_data, dirs["scancel"], endless),
            "--time=10",
            name="scancel",
        ),
        "killed": slurm.submit("pretrain.sbatch", killed_args, "--time=10", name="killed"),
        "bad": slurm.submit("pretrain.sbatch", bad_args, "--time=10", name="bad"),
    }
    results: dict = {"dirs": dirs, "jobs": jobs}

    sft, sft_out = jobs["sft"]
    slurm.wait_steps(sft, dirs["sft"], sft_out, 2)
    with paused(training_ranks(dirs["sft"])):  # its warning comes while the others are handled
        cut_time_limit(slurm, sft)
        jid, out = jobs["term"]
        slurm.wait_steps(jid, dirs["term"], out, 2)
        slurm.cmd("scancel", "--batch", "--signal=TERM", jid)
        jid, out = jobs["scancel"]
        slurm.wait_steps(jid, dirs["scancel"], out, 2)
        slurm.cmd("scancel", jid)
        jid, out = jobs["killed"]
        slurm.wait_steps(jid, dirs["killed"], out, 12)
        # SIGKILL to every process of the job at once: a lost node, or a KillWait shorter
        # than the save
        subprocess.run(["pkill", "-KILL", "-f", f"run_dir={dirs['killed']} "], check=True)
        slurm.wait_state(jid, {"CANCELLED", "FAILED"}, out)
        latest = (dirs["killed"] / "checkpoints" / "latest").read_text()
        results["killed"] = (latest, (dirs["killed"] / "run.lock").read_text())
        stop = int(latest.removeprefix("step_")) + 5
        jobs["again"] = slurm.submit(
            "pretrain.sbatch",
            [*killed_args, f"trainer.max_steps={stop}"],
            "--time=10",
            name="again",
        )
        wait_for_warning(sft_out)
    release_requeued(slurm, sft, dirs["sft"], sft_out)
    results["state"] = {
        name: slurm.wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED"}, out)
        for name, (jid, out) in jobs.items()
    }
    deadline = time.time() + 30  # a cancelled job's ranks may still be saving
    while not (dirs["scancel"] / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.2)
    return results


def preemption_step(text: str) -> int:
    return int(
        re.search(r"pre-emption signal received: checkpointing at step (\d+)", text).group(1)
    )


# ---- 2. scancel --batch --signal=TERM: checkpoint, exit 0, no requeue ------------------------
def test_scancel_batch_term_checkpoints_without_requeue(second_wave, slurm):
    jid, out = second_wave["jobs"]["term"]
    run_dir, info, text = second_wave["dirs"]["term"], second_wave["state"]["term"], out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    step = preemption_step(text)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert "requeueing" not in text and slurm.runs_of(jid) == ["COMPLETED"]
    assert not (run_dir / "export").exists()


# ---- 3. scancel: SIGTERM to every process, SIGKILL after KillWait ----------------------------
def test_scancel_saves_within_killwait(second_wave, slurm):
    """KillWait=10 s (the fixture's slurm.conf): ample for the ranks to save."""
    jid, out = second_wave["jobs"]["scancel"]
    run_dir, info, text = (
        second_wave["dirs"]["scancel"],
        second_wave["state"]["scancel"],
        out.read_text(),
    )
    assert info["JobState"] == "CANCELLED", info
    step = preemption_step(text)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}", text[-4000:]
    assert slurm.runs_of(jid) == ["CANCELLED"]


def test_killed_job_leaves_its_last_checkpoint_and_lock_to_the_next(second_wave, pretrain_jobs):
    """No time to save at all: the last complete checkpoint is intact, and the next submission
    takes over the dead job's run_dir lock with a warning, resumes from that checkpoint and
    matches the uninterrupted reference."""
    jid, _ = second_wave["jobs"]["killed"]
    again, out = second_wave["jobs"]["again"]
    run_dir, (latest, lock_text) = second_wave["dirs"]["killed"], second_wave["killed"]
    saved = int(latest.removeprefix("step_"))
    assert saved >= 10 and saved % 5 == 0 and saved + 5 <= STEPS
    assert f'"slurm_job_id": "{jid}"' in lock_text  # the dead holder's name was left behind
    text = out.read_text()
    assert second_wave["state"]["again"]["JobState"] == "COMPLETED", text[-4000:]
    assert f"warning: taking over {run_dir / 'run.lock'}: its holder SLURM job {jid} (host " in text
    assert f"resumed from {run_dir / 'checkpoints' / latest} at step {saved}" in text
    got = losses(run_dir)  # steps after the last save were logged twice: the resumed run's count
    assert all(got[s] == pretrain_jobs["losses"][s] for s in range(1, saved + 6))


# ---- 4. sft.sbatch from a pretraining export, same cycle ------------------------------------
def test_sft_sbatch_preempts_requeues_and_finishes(second_wave, slurm):
    jid, out = second_wave["jobs"]["sft"]
    run_dir, info, text = second_wave["dirs"]["sft"], second_wave["state"]["sft"], out.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    step = preemption_step(text)
    assert (
        f"llada slurm job {jid} (start 2): sft" in text
        and "resumed from" in text
        and f"at step {step}" in text
    )
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, SFT_STEPS + 1))
    assert run_info_jobs(run_dir) == [jid, jid]
    assert slurm.runs_of(jid) == ["PENDING", "COMPLETED"]
    assert (run_dir / "export" / "model.safetensors").exists()


# ---- 5. bad input inside a job ----------------------------------------------------------------
def test_bad_data_path_fails_the_job_with_one_line(second_wave, slurm):
    jid, out = second_wave["jobs"]["bad"]
    run_dir, info, text = second_wave["dirs"]["bad"], second_wave["state"]["bad"], out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_such_shards" in errors[0], text
    assert "Traceback" not in text and "requeue" not in text
    assert slurm.runs_of(jid) == ["FAILED"]
    # nothing of a run is written (Hydra's own log file aside)
    assert not run_dir.exists() or {p.name for p in run_dir.iterdir()} <= {"pretrain.log"}
