"""Checkpoints never run code on load, and a save never leaves a half-written step folder.

A payload pickle (its ``__reduce__`` creates a marker file) replaces a DeepSpeed file of a
real ZeRO-2 checkpoint: resuming and ``llada-export`` refuse it with one line, and the
marker never appears. Saves are checked with a stand-in engine that fails mid-write.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from llada_train import atomic
from llada_train.atomic import write_text_atomic
from llada_train.errors import LladaError
from llada_train.train import checkpointing as ckpt
from llada_train.train.manifest import MANIFEST, TRUST_ENV
from tests.launch_utils import cli

TAG = "step_00000002"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_bytes(marker: Path, size: int | None = None) -> bytes:
    """A pickle with the payload, padded to ``size`` (pickle ignores bytes after STOP)."""
    data = pickle.dumps(Payload(marker), protocol=2)
    return data if size is None else data + b"\0" * (size - len(data))


def overrides(demo_data: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        f"run_dir={run_dir}", f"data.path={demo_data / 'shards'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}", f"trainer.max_steps={steps}",
        "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
        "deepspeed=zero2", "logging.progress_bar=false", "trainer.export_at_end=false",
    ]


@pytest.fixture(scope="module")
def zero2_run(demo_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    cli("llada-pretrain", overrides(demo_data, run_dir, 2))
    assert (run_dir / "checkpoints" / "latest").read_text() == TAG
    return run_dir


@pytest.fixture
def run_copy(zero2_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(zero2_run, dst)
    return dst


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_the_payload_runs_when_unpickled_plainly(tmp_path):
    # the control: without our checks, torch.load (as DeepSpeed calls it) runs the payload
    marker = tmp_path / "ran"
    path = tmp_path / "x.pt"
    path.write_bytes(payload_bytes(marker, 4096))
    with pytest.raises(Exception):  # noqa: B017 - the load fails after the payload ran
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_save_writes_a_manifest_of_every_file(zero2_run):
    step = zero2_run / "checkpoints" / TAG
    files = json.loads((step / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in step.iterdir() if p.name != MANIFEST)
    assert {MODEL, OPTIM, "trainer_state.json", "rank_state_00000.pt"} <= set(files)
    assert not list((zero2_run / "checkpoints").glob(".partial_*"))


@pytest.mark.parametrize("victim", [OPTIM, MODEL])
def test_resume_refuses_a_replaced_file_and_never_runs_it(demo_data, run_copy, tmp_path, victim):
    marker = tmp_path / "ran"
    f = run_copy / "checkpoints" / TAG / victim
    f.write_bytes(payload_bytes(marker, f.stat().st_size))  # same size: only sha256 tells
    proc = cli("llada-pretrain", overrides(demo_data, run_copy, 3), check=False)
    line = one_error_line(proc)
    assert str(f) in line and "does not match the sha256" in line and "written at save time" in line
    assert not marker.exists()


def test_export_refuses_a_replaced_file_and_never_runs_it(run_copy, tmp_path):
    marker = tmp_path / "ran"
    f = run_copy / "checkpoints" / TAG / OPTIM
    f.write_bytes(payload_bytes(marker, f.stat().st_size))
    out = tmp_path / "export"
    line = one_error_line(cli("llada-export", ["--run-dir", str(run_copy), "--out", str(out)], check=False))
    assert str(f) in line and "does not match the sha256" in line
    assert not marker.exists() and not out.exists()


def test_export_refuses_an_added_shard(run_copy, tmp_path):
    marker = tmp_path / "ran"
    extra = run_copy / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    extra.write_bytes(payload_bytes(marker))  # zero_to_fp32 globs *_optim_states.pt
    line = one_error_line(
        cli("llada-export", ["--run-dir", str(run_copy), "--out", str(tmp_path / "e")], check=False)
    )
    assert str(extra) in line and "is not in the manifest.json written at save time" in line
    assert not marker.exists()


def test_resume_refuses_a_truncated_file(demo_data, run_copy):
    f = run_copy / "checkpoints" / TAG / MODEL
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    line = one_error_line(cli("llada-pretrain", overrides(demo_data, run_copy, 3), check=False))
    assert f"{f} is {size // 2} bytes but was {size} when saved" in line


def test_checkpoint_without_manifest_needs_explicit_trust(run_copy, tmp_path, monkeypatch):
    (run_copy / "checkpoints" / TAG / MANIFEST).unlink()
    out = tmp_path / "export"
    args = ["--run-dir", str(run_copy), "--out", str(out)]
    line = one_error_line(cli("llada-export", args, check=False))
    assert f"{run_copy / 'checkpoints' / TAG} has no manifest.json" in line
    assert f"{TRUST_ENV}=1" in line and not out.exists()
    monkeypatch.setenv(TRUST_ENV, "1")  # launch_env copies os.environ
    proc = cli("llada-export", args)
    assert f"warning: loading {run_copy / 'checkpoints' / TAG} unverified ({TRUST_ENV}=1)" in proc.stderr
    assert (out / "model.safetensors").exists()


def test_rank_state_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "rank_state_00000.pt"
    torch.save({"reader": Payload(marker)}, path)
    with pytest.raises(LladaError, match="refusing to unpickle"):
        ckpt.load_rank_state(path)
    assert not marker.exists()
    state = {"reader": {"position": 7, "order": [1, 2]}, "generator": torch.Generator().get_state()}
    torch.save(state, path)
    loaded = ckpt.load_rank_state(path)
    assert loaded["reader"] == state["reader"] and torch.equal(loaded["generator"], state["generator"])


class FakeEngine:
    """Writes DeepSpeed-like files; ``fail`` is raised after the first file is written."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.loaded = fail, False

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MODEL).write_bytes(b"m" * 1000)
        if self.fail is not None:
            raise self.fail
        (folder / OPTIM).write_bytes(b"o" * 3000)

    def load_checkpoint(self, root: str, tag: str, **_: object) -> tuple[str, dict]:
        self.loaded = True
        return str(Path(root) / tag), {}


def save(run_dir: Path, step: int, engine: FakeEngine | None = None) -> Path:
    state = {"step": step, "world_size": 1, "zero_stage": 2}
    rank_state = {"reader": {"position": step}, "generator": torch.Generator().get_state()}
    return ckpt.save_checkpoint(engine or FakeEngine(), run_dir, step, state, rank_state, keep_last=3)


@pytest.mark.parametrize(
    "fail,words",
    [
        (OSError(errno.ENOSPC, "No space left on device", "x.pt"), "No space left on device"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
         "is the disk full?"),
        (PermissionError(errno.EACCES, "Permission denied", "x.pt"), "make the run directory writable"),
    ],
)
def test_failed_save_leaves_no_partial_step_and_keeps_latest(tmp_path, fail, words):
    root = ckpt.checkpoint_dir(tmp_path)
    save(tmp_path, 1)
    with pytest.raises(LladaError) as err:
        save(tmp_path, 2, FakeEngine(fail))
    msg = str(err.value)
    assert msg.startswith(f"cannot write checkpoint {root / 'step_00000002'}") and words in msg
    assert "\n" not in msg and "the previous one is intact" in msg
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert ckpt.latest_tag(tmp_path) == "step_00000001"


def test_save_replaces_a_killed_partial_and_load_checks_the_manifest(tmp_path):
    root = ckpt.checkpoint_dir(tmp_path)
    stale = root / ".partial_step_00000003"
    stale.mkdir(parents=True)
    (stale / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"half")
    folder = save(tmp_path, 3)
    assert folder == root / "step_00000003" and not stale.exists()
    assert "zero_pp_rank_9_mp_rank_00_optim_states.pt" not in json.loads((folder / MANIFEST).read_text())["files"]
    engine = FakeEngine()
    state, rank_state = ckpt.load_checkpoint(engine, tmp_path, "step_00000003")
    assert engine.loaded and state["step"] == 3 and rank_state["reader"] == {"position": 3}
    save(tmp_path, 3)  # the same step saved again (after a resume from an older one) replaces it
    assert ckpt.latest_tag(tmp_path) == "step_00000003" and not list(root.glob(".partial_*"))
    with open(folder / OPTIM, "r+b") as f:  # one flipped byte, same size
        f.write(b"O")
    engine = FakeEngine()
    with pytest.raises(LladaError, match="does not match the sha256"):
        ckpt.load_checkpoint(engine, tmp_path, "step_00000003")
    assert not engine.loaded


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    write_text_atomic(target, "step_00000001")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "step_00000002")
    assert target.read_text() == "step_00000001" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_export_names_a_missing_tokenizer_and_ships_its_config(zero2_run, tmp_path):
    args = ["--run-dir", str(zero2_run), "--out", str(tmp_path / "e")]
    line = one_error_line(cli("llada-export", [*args, "--tokenizer", str(tmp_path / "nope")], check=False))
    assert line == (
        f"error: tokenizer {tmp_path / 'nope'} (from {zero2_run / 'config.yaml'} or --tokenizer) not "
        "found: pass --tokenizer PATH, or --tokenizer none to export without tokenizer files"
    )
    assert not (tmp_path / "e").exists()
    cli("llada-export", args)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in (tmp_path / "e").iterdir()
    }
