"""launch/slurm/*.sbatch on a live single-node SLURM (munged + slurmctld + slurmd, started by
scripts/local_slurm.py under a temp dir and stopped by pid at the end).

Every job is submitted as a user submits it (``sbatch launch/slurm/pretrain.sbatch ...`` from
the repository root, with GPUS_PER_NODE / LLADA_DEVICE / LLADA_PYTHON exported), 2 CPU ranks
of the tiny model on the demo data. What these tests drive from outside is only what a
scheduler or an operator does: time limits, ``scancel``, resubmission.

Two SLURM behaviours the tests work with (Slurm 22.05):
- A requeued job waits on a begin time (``Reason=BeginTime``) of cred_expire + 1 s, 121 s by
  default; the fixture's slurm.conf sets ``AuthInfo=...,cred_expire=20``.
- The ``--signal=B:USR1@N`` warning is sent by slurmctld's periodic time-limit check, so it
  can come some seconds before or after the asked time; the test shortens the time limit
  with ``scontrol update`` once training runs, so the warning never lands in start-up.

Skipped (with the apt-get line) where the Debian packages are absent or not root; CI sets
LLADA_REQUIRE_SLURM=1 after installing them, so there these tests fail rather than skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO
from tests.launch_utils import launch_env, metrics
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

pytestmark = pytest.mark.slow

STEPS = 40  # the ranks are paused while a warning is on its way (cut_time_limit)
SFT_STEPS = 30
WARN = "--signal=B:USR1@240"  # cut_time_limit leaves 3-4 minutes: the warning is due at once
PRETRAIN = [
    "trainer.seq_len=16",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=1",
    "logging.log_every=1",
    "logging.progress_bar=false",
    f"trainer.max_steps={STEPS}",
]
ENDLESS = "trainer.max_steps=100000"  # runs that end by a signal: never first by themselves


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


def sft(demo_data: Path, run_dir: Path, init_from: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"init_from={init_from}",
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


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def run_info_jobs(run_dir: Path) -> list[str | None]:
    import json

    return [
        json.loads(line).get("slurm_job_id")
        for line in (run_dir / "run_info.jsonl").read_text().splitlines()
    ]


# ---- every job of the module, side by side: one wave keeps the scheduler's waits overlapped ----
@pytest.fixture(scope="module")
def wave(slurm, demo_data, tmp_path_factory):
    """Nine jobs on 2 CPUs (each runs slower, so a pre-emption window holds fewer steps):
    - an uninterrupted pretraining reference, and a twin submitted on its run_dir while it
      runs, which must stop at the run_dir lock;
    - pretraining and SFT (from a pretraining export) pre-empted by their time limits, which
      requeue themselves;
    - pretraining runs ended by ``scancel --batch --signal=TERM``, by ``scancel``, and by
      SIGKILL of every process (then a resubmission that takes the dead job's lock over);
    - a data path that does not exist."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {
        n: root / n for n in ("reference", "preempted", "sft", "term", "scancel", "killed", "bad")
    }
    killed_args = pretrain(demo_data, dirs["killed"], "trainer.save_every=5", ENDLESS)
    bad_args = pretrain(demo_data, dirs["bad"])
    bad_args[1] = f"data.path={root / 'no_such_shards'}"
    submit = slurm.submit
    jobs = {
        "reference": submit("pretrain.sbatch", pretrain(demo_data, dirs["reference"]), name="reference"),
        "preempted": submit("pretrain.sbatch", pretrain(demo_data, dirs["preempted"]), WARN, name="preempted"),
        "term": submit("pretrain.sbatch", pretrain(demo_data, dirs["term"], ENDLESS), name="term"),
        "scancel": submit("pretrain.sbatch", pretrain(demo_data, dirs["scancel"], ENDLESS), name="scancel"),
        "killed": submit("pretrain.sbatch", killed_args, name="killed"),
        "bad": submit("pretrain.sbatch", bad_args, name="bad"),
    }  # fmt: skip
    # The SFT job starts from a pretraining export, made here while those jobs start up.
    base = root / "base"
    export = subprocess.Popen(
        [str(BIN / "llada-pretrain"), *pretrain(demo_data, base, "trainer.max_steps=2")],
        env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    results: dict = {"dirs": dirs, "jobs": jobs}

    def each(name: str, n: int, action) -> dict:
        jid, out = jobs[name]
        return {jid: (out, dirs[name], n, action)}

    def kill_every_process() -> None:
        # SIGKILL to every process of the job at once: a lost node, or a KillWait shorter
        # than the save
        subprocess.run(["pkill", "-KILL", "-f", f"run_dir={dirs['killed']} "], check=True)

    # each held run is paused from its 2nd step until its part is done: the reference until
    # its twin has been refused, a pre-empted run until its warning has come
    holds = {name: contextlib.ExitStack() for name in ("reference", "preempted", "sft")}

    def hold(name: str, cut_limit: bool = False):
        def act() -> None:
            holds[name].enter_context(paused(training_ranks(dirs[name])))
            if cut_limit:
                cut_time_limit(slurm, jobs[name][0])

        return act

    try:
        slurm.on_steps({
            **each("reference", 2, hold("reference")),
            **each("preempted", 2, hold("preempted", cut_limit=True)),
            **each("term", 2, lambda: slurm.cmd("scancel", "--batch", "--signal=TERM", jobs["term"][0])),
            **each("scancel", 2, lambda: slurm.cmd("scancel", jobs["scancel"][0])),
            **each("killed", 12, kill_every_process),
        })  # fmt: skip
        jobs["twin"] = submit("pretrain.sbatch", pretrain(demo_data, dirs["reference"]), name="twin")  # fmt: skip
        log = export.communicate(timeout=300)[0]
        assert export.returncode == 0, log
        sft_args = sft(demo_data, dirs["sft"], base / "export")
        jobs["sft"] = submit("sft.sbatch", sft_args, WARN, name="sft")
        slurm.wait_state(*jobs["killed"], {"CANCELLED", "FAILED"})
        latest = (dirs["killed"] / "checkpoints" / "latest").read_text()
        results["killed"] = (latest, (dirs["killed"] / "run.lock").read_text())
        stop = int(latest.removeprefix("step_")) + 5
        jobs["again"] = submit(
            "pretrain.sbatch", [*killed_args, f"trainer.max_steps={stop}"], name="again"
        )
        slurm.on_steps(each("sft", 2, hold("sft", cut_limit=True)))
        results["twin"] = slurm.wait_state(*jobs["twin"], {"COMPLETED", "FAILED"})
        holds["reference"].close()
        wait_for_warning(jobs["preempted"][1])
        holds["preempted"].close()
        wait_for_warning(jobs["sft"][1])
        holds["sft"].close()
    finally:
        for h in holds.values():
            h.close()
    release_requeued(slurm, *jobs["preempted"])
    release_requeued(slurm, *jobs["sft"])
    results["state"] = {
        name: slurm.wait_state(jid, out, {"COMPLETED", "FAILED", "CANCELLED"})
        for name, (jid, out) in jobs.items()
    }
    deadline = time.time() + 30  # a cancelled job's ranks may still be saving
    while not (dirs["scancel"] / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.2)
    return results


def test_second_job_on_a_live_run_dir_stops_with_one_line(wave, slurm):
    holder, _ = wave["jobs"]["reference"]
    twin, out = wave["jobs"]["twin"]
    run_dir, info, text = wave["dirs"]["reference"], wave["twin"], out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert f"run_dir {run_dir} is in use by SLURM job {holder} (host " in errors[0]
    assert "Traceback" not in text
    assert slurm.runs_of(twin) == ["FAILED"]  # not requeued
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))  # the holder ran on
    assert run_info_jobs(run_dir) == [holder]  # the twin wrote nothing into the run_dir


# ---- 1. time-limit pre-emption: checkpoint, requeue, resume, finish -------------------------
def test_time_limit_preemption_requeues_and_resumes_exactly(wave, slurm):
    jid, out = wave["jobs"]["preempted"]
    run_dir, info, text = wave["dirs"]["preempted"], wave["state"]["preempted"], out.read_text()
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
        output_tail(out),
    )
    saved = text.find(f"checkpoint saved: {run_dir / 'checkpoints' / f'step_{step:08d}'}")
    assert 0 <= saved < positions[3]
    assert run_info_jobs(run_dir) == [jid, jid]  # two starts of one job
    assert slurm.runs_of(jid) == ["PENDING", "COMPLETED"]  # the requeue, then the finish
    # bitwise on CPU: every loss after the resume equals the uninterrupted run's
    assert losses(run_dir) == losses(wave["dirs"]["reference"])


def preemption_step(text: str) -> int:
    return int(
        re.search(r"pre-emption signal received: checkpointing at step (\d+)", text).group(1)
    )


# ---- 2. scancel --batch --signal=TERM: checkpoint, exit 0, no requeue ------------------------
def test_scancel_batch_term_checkpoints_without_requeue(wave, slurm):
    jid, out = wave["jobs"]["term"]
    run_dir, info, text = wave["dirs"]["term"], wave["state"]["term"], out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, output_tail(out))
    step = preemption_step(text)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert "requeueing" not in text and slurm.runs_of(jid) == ["COMPLETED"]
    assert not (run_dir / "export").exists()


# ---- 3. scancel: SIGTERM to every process, SIGKILL after KillWait ----------------------------
def test_scancel_saves_within_killwait(wave, slurm):
    """KillWait=10 s (the fixture's slurm.conf): ample for the ranks to save."""
    jid, out = wave["jobs"]["scancel"]
    run_dir, info, text = (
        wave["dirs"]["scancel"],
        wave["state"]["scancel"],
        out.read_text(),
    )
    assert info["JobState"] == "CANCELLED", info
    step = preemption_step(text)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}", output_tail(out)
    assert slurm.runs_of(jid) == ["CANCELLED"]


def test_killed_job_leaves_its_last_checkpoint_and_lock_to_the_next(wave):
    """No time to save at all: the last complete checkpoint is intact, and the next submission
    takes over the dead job's run_dir lock with a warning, resumes from that checkpoint and
    matches the uninterrupted reference."""
    jid, _ = wave["jobs"]["killed"]
    again, out = wave["jobs"]["again"]
    run_dir, (latest, lock_text) = wave["dirs"]["killed"], wave["killed"]
    saved = int(latest.removeprefix("step_"))
    assert saved >= 10 and saved % 5 == 0 and saved + 5 <= STEPS
    assert f'"slurm_job_id": "{jid}"' in lock_text  # the dead holder's name was left behind
    text = out.read_text()
    assert wave["state"]["again"]["JobState"] == "COMPLETED", output_tail(out)
    assert f"warning: taking over {run_dir / 'run.lock'}: its holder SLURM job {jid} (host " in text
    assert f"resumed from {run_dir / 'checkpoints' / latest} at step {saved}" in text
    got = losses(run_dir)  # steps after the last save were logged twice: the resumed run's count
    reference = losses(wave["dirs"]["reference"])
    assert all(got[s] == reference[s] for s in range(1, saved + 6))


# ---- 4. sft.sbatch from a pretraining export, same cycle ------------------------------------
def test_sft_sbatch_preempts_requeues_and_finishes(wave, slurm):
    jid, out = wave["jobs"]["sft"]
    run_dir, info, text = wave["dirs"]["sft"], wave["state"]["sft"], out.read_text()
    assert info["JobState"] == "COMPLETED", output_tail(out)
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
def test_bad_data_path_fails_the_job_with_one_line(wave, slurm):
    jid, out = wave["jobs"]["bad"]
    run_dir, info, text = wave["dirs"]["bad"], wave["state"]["bad"], out.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_such_shards" in errors[0], text
    assert "Traceback" not in text and "requeue" not in text
    assert slurm.runs_of(jid) == ["FAILED"]
    # nothing of a run is written (Hydra's own log file aside)
    assert not run_dir.exists() or {p.name for p in run_dir.iterdir()} <= {"pretrain.log"}
