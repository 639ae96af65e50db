"""Checkpoints never run code on load, and a save never leaves a half-written step folder.

A payload pickle (its ``__reduce__`` creates a marker file) replaces a DeepSpeed file of a
real checkpoint: resuming and ``llada-export`` refuse it with one line, and the marker never
appears; also when the forger recomputed the manifest (ZeRO 0, 2 and 3: every file unpickles
weights-only) and under ``LLADA_TRUST_UNVERIFIED_CHECKPOINTS=1``. A genuine ZeRO-3 checkpoint
still resumes and exports. Saves are checked with a stand-in engine that fails mid-write.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llada_train import atomic
from llada_train.atomic import write_text_atomic
from llada_train.cli.export import main as export_main
from llada_train.errors import LladaError
from llada_train.train import checkpointing as ckpt
from llada_train.train.manifest import MANIFEST, TRUST_ENV, sha256_file, verify_manifest
from llada_train.train.safe_load import check_pickles, weights_only_loads
from tests.forked_launches import forked_launches, launched
from tests.launch_utils import one_error_line

TAG = "step_00000002"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
MODEL3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3's module state, one per rank
REFUSED = "holds objects outside the checkpoint allowlist"


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


def overrides(demo_data: Path, run_dir: Path, steps: int, stage: int = 2, export: bool = False) -> list[str]:
    return [
        f"run_dir={run_dir}", f"data.path={demo_data / 'shards'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}", f"trainer.max_steps={steps}",
        "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
        "model.n_layers=2", f"deepspeed=zero{stage}", "logging.progress_bar=false",
        f"trainer.export_at_end={str(export).lower()}",
    ]


@pytest.fixture(scope="module")
def saved(demo_data, tmp_path_factory) -> dict[int, Path]:
    """A 1-rank, 2-step run of each ZeRO stage (0, 2, 3), trained once per module, the three
    after one import (``forked_launches``)."""
    root = tmp_path_factory.mktemp("saved")
    runs = {stage: root / f"zero{stage}" / "run" for stage in (0, 2, 3)}
    cases = [{"argv": overrides(demo_data, run_dir, 2, stage)} for stage, run_dir in runs.items()]
    results = forked_launches("llada_train.cli.pretrain", cases, root / "logs")
    for (code, out), run_dir in zip(results, runs.values(), strict=True):
        assert code == 0, out[-3000:]
        assert (run_dir / "checkpoints" / "latest").read_text() == TAG
    return runs


@pytest.fixture
def zero2_run(saved) -> Path:
    return saved[2]


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def run_copy(zero2_run, tmp_path) -> Path:
    return copy_run(zero2_run, tmp_path)


def forge(step: Path, victim: str, marker: Path, manifest: bool = True) -> Path:
    """Replace ``victim`` with a torch.save archive holding the payload; with ``manifest``,
    recompute the step's manifest to match, as anyone handing over a whole folder can."""
    f = step / victim
    torch.save({"module": {}, "optimizer_state_dict": Payload(marker)}, f)
    if manifest:
        files = json.loads((step / MANIFEST).read_text())
        files["files"][victim] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        (step / MANIFEST).write_text(json.dumps(files))
        assert verify_manifest(step)  # the hash check alone would let it through
    return f


def export(capsys, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """``llada-export ARGS`` run in this process: the console script is this ``main``, so the
    checks are the same code, without a fresh interpreter's seconds of imports. A payload that
    ran would still leave its marker, and any other exception than the one-line exit fails."""
    try:
        export_main(args)
        code = 0
    except SystemExit as exc:  # exit_on_error (and argparse) end with sys.exit
        code = exc.code
    out = capsys.readouterr()
    proc = subprocess.CompletedProcess(["llada-export", *args], code, out.out, out.err)
    assert not check or code == 0, f"llada-export {args} failed ({code}):\n{out.err[-5000:]}"
    return proc


# the resume entry point with the pickle scan switched off: DeepSpeed's loads stand alone
NO_SCAN = "import llada_train.train.checkpointing as c; c.check_pickles = lambda *a, **k: None"
# one file per stage; resume scans every pickle, export reads each file kind in turn
FORGED = [(0, MODEL), (2, OPTIM), (3, MODEL3)]


def replace_with_payload(step: Path, victim: str, marker: Path) -> Path:
    """Overwrite ``victim`` with the payload at its own size: only sha256 tells."""
    f = step / victim
    f.write_bytes(payload_bytes(marker, f.stat().st_size))
    return f


def truncate(step: Path, victim: str, marker: Path) -> Path:
    f = step / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


# name -> (ZeRO stage, alteration of the saved step folder or None, victim, extra for the launch)
RESUMES = {
    # one file stands for all: every file of the manifest (test_save_writes_a_manifest...) goes
    # through the same hash loop, and the model file's size check at resume is "truncated"
    "replaced": (2, replace_with_payload, OPTIM, {}),
    "truncated": (2, truncate, MODEL, {}),
    **{f"forged{stage}": (stage, forge, victim, {}) for stage, victim in FORGED},
    "no_scan": (3, forge, OPTIM, {"exec": NO_SCAN}),  # ZeRO-3's optimizer load path
    "genuine3": (3, None, None, {"export": True}),
}


@pytest.fixture(scope="module")
def resumes(demo_data, saved, tmp_path_factory) -> dict[str, tuple]:
    """Each RESUMES case: a copy of the saved run of its stage, altered, then resumed to step 3
    by ``llada-pretrain`` from ``main()`` on, all after one import (``forked_launches``):
    name -> (run dir, the altered file, its payload's marker, the launch's result)."""
    root = tmp_path_factory.mktemp("resumes")
    prepared, cases = {}, []
    for name, (stage, alter, victim, extra) in RESUMES.items():
        run_dir = copy_run(saved[stage], root / name)
        marker = root / name / "ran"
        f = alter(run_dir / "checkpoints" / TAG, victim, marker) if alter else None
        prepared[name] = (run_dir, f, marker)
        argv = overrides(demo_data, run_dir, 3, stage, export=extra.get("export", False))
        cases.append({"argv": argv, "exec": extra.get("exec", "")})
    results = forked_launches("llada_train.cli.pretrain", cases, root / "logs")
    return {name: (*prepared[name], launched(r)) for name, r in zip(RESUMES, results, strict=True)}


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


def test_resume_refuses_a_replaced_file_and_never_runs_it(resumes):
    _, f, marker, proc = resumes["replaced"]
    line = one_error_line(proc)
    assert str(f) in line and "does not match the sha256" in line and "written at save time" in line
    assert not marker.exists()


def test_export_refuses_a_replaced_file_and_never_runs_it(run_copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    f = run_copy / "checkpoints" / TAG / OPTIM
    f.write_bytes(payload_bytes(marker, f.stat().st_size))
    out = tmp_path / "export"
    line = one_error_line(export(capsys, ["--run-dir", str(run_copy), "--out", str(out)], check=False))
    assert str(f) in line and "does not match the sha256" in line
    assert not marker.exists() and not out.exists()


def test_export_refuses_an_added_shard(run_copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    extra = run_copy / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    extra.write_bytes(payload_bytes(marker))  # zero_to_fp32 globs *_optim_states.pt
    line = one_error_line(
        export(capsys, ["--run-dir", str(run_copy), "--out", str(tmp_path / "e")], check=False)
    )
    assert str(extra) in line and "is not in the manifest.json written at save time" in line
    assert not marker.exists()


@pytest.mark.parametrize("stage,victim", FORGED)
def test_forged_file_with_a_matching_manifest_is_refused_and_never_runs(
    resumes, tmp_path, capsys, stage, victim
):
    run_dir, f, marker, proc = resumes[f"forged{stage}"]
    assert f.name == victim
    line = one_error_line(proc)
    assert line.startswith(f"error: {f} {REFUSED}") and "the checkpoint is refused" in line
    out = tmp_path / "export"
    line = one_error_line(export(capsys, ["--run-dir", str(run_dir), "--out", str(out)], check=False))
    assert line.startswith(f"error: {f} {REFUSED}") and "the checkpoint is refused" in line
    assert not marker.exists() and not out.exists()


def test_deepspeeds_own_loads_are_weights_only_without_the_scan(resumes):
    _, f, marker, proc = resumes["no_scan"]  # the resume with the pickle scan switched off
    line = one_error_line(proc)
    assert line.startswith(f"error: {f} {REFUSED} (Unsupported global: GLOBAL ")
    assert not marker.exists()


def test_a_genuine_zero3_checkpoint_resumes_and_exports_weights_only(resumes, tmp_path, capsys):
    # what a real checkpoint holds is allowlisted; the other genuine loads are tested elsewhere:
    # ZeRO-0/2 resume (test_train_e2e, the kill -9 test), ZeRO-2 export (below), ZeRO-0/3
    # export (test_train_distributed)
    run_dir, _, _, proc = resumes["genuine3"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / TAG} at step 2" in proc.stdout
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    export(capsys, ["--run-dir", str(run_dir), "--out", str(tmp_path / "offline")])
    live = load_file(run_dir / "export" / "model.safetensors")
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)


def test_weights_only_loads_covers_deepspeeds_loader_and_restores_torch(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    marker, bad, good = tmp_path / "ran", tmp_path / "bad.pt", tmp_path / "good.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, bad)
    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "t": torch.ones(2)}
    torch.save(state, good)
    bound_early, load = torch.load, TorchCheckpointEngine().load  # DeepSpeed: weights_only=False
    with weights_only_loads(tmp_path):
        loaded = load(str(good), map_location="cpu")
        assert loaded["zero_stage"] == 2 and loaded["loss_scaler"].cur_scale == 1.0
        assert loaded["param_slice_mappings"][0]["w"].numel == 4
        with pytest.raises(LladaError, match=f"{bad} {REFUSED}"):
            load(str(bad), map_location="cpu")
    with pytest.raises(LladaError, match=f"a file of {tmp_path} {REFUSED}"), weights_only_loads(tmp_path):
        bound_early(bad, weights_only=False)  # a loader bound before the scope: torch's own override
    assert not marker.exists() and torch.load is bound_early
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    with pytest.raises(pickle.UnpicklingError):  # outside the scope nothing is allowlisted
        torch.load(good, weights_only=True)
    # resume first scans every pickle statically, so all ranks refuse a bad shard together
    with pytest.raises(LladaError, match=re.escape(f"{bad} {REFUSED} (GLOBAL ")):
        check_pickles(tmp_path)
    bad.write_bytes(payload_bytes(marker))  # a bare pickle, not torch.save's zip archive
    with pytest.raises(LladaError, match=re.escape(f"{bad} is not a readable torch.save archive")):
        check_pickles(tmp_path)
    assert not marker.exists()


def test_resume_refuses_a_truncated_file(saved, resumes):
    _, f, _, proc = resumes["truncated"]
    size = (saved[2] / "checkpoints" / TAG / MODEL).stat().st_size
    line = one_error_line(proc)
    assert f"{f} is {size // 2} bytes but was {size} when saved" in line


def test_checkpoint_without_manifest_needs_explicit_trust(run_copy, tmp_path, monkeypatch, capsys):
    (run_copy / "checkpoints" / TAG / MANIFEST).unlink()
    out = tmp_path / "export"
    args = ["--run-dir", str(run_copy), "--out", str(out)]
    line = one_error_line(export(capsys, args, check=False))
    assert f"{run_copy / 'checkpoints' / TAG} has no manifest.json" in line
    assert f"{TRUST_ENV}=1" in line and not out.exists()
    monkeypatch.setenv(TRUST_ENV, "1")
    proc = export(capsys, args)
    assert f"warning: loading {run_copy / 'checkpoints' / TAG} unverified ({TRUST_ENV}=1)" in proc.stderr
    assert (out / "model.safetensors").exists()
    # trust skips the hash check only: a forged file is still unpickled weights-only
    marker = tmp_path / "ran"
    f = forge(run_copy / "checkpoints" / TAG, OPTIM, marker, manifest=False)
    line = one_error_line(export(capsys, [*args[:3], str(tmp_path / "e2")], check=False))
    assert line.startswith(f"error: {f} {REFUSED}") and not marker.exists()


def test_rank_state_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "rank_state_00000.pt"
    torch.save({"reader": Payload(marker)}, path)
    with pytest.raises(LladaError, match=f"{path} {REFUSED}"):
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
        torch.save({"module": {"w": torch.ones(250)}}, folder / MODEL)  # loads are pickle-scanned
        if self.fail is not None:
            raise self.fail
        torch.save({"optimizer_state_dict": {"m": torch.ones(750)}}, folder / OPTIM)

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
        f.write(b"X")
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


def test_export_names_a_missing_tokenizer_and_ships_its_config(zero2_run, tmp_path, capsys):
    args = ["--run-dir", str(zero2_run), "--out", str(tmp_path / "e")]
    line = one_error_line(export(capsys, [*args, "--tokenizer", str(tmp_path / "nope")], check=False))
    assert line == (
        f"error: tokenizer {tmp_path / 'nope'} (from {zero2_run / 'config.yaml'} or --tokenizer) not "
        "found: pass --tokenizer PATH, or --tokenizer none to export without tokenizer files"
    )
    assert not (tmp_path / "e").exists()
    export(capsys, args)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in (tmp_path / "e").iterdir()
    }
