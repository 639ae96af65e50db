"""``llada-torchrun``: torchrun that ends a failed run with one line (the rank's own on bad
input) and the rank's exit code, instead of torchrun's ``ChildFailedError`` report and rc 1;
and hands SIGTERM/SIGUSR1 to the ranks with a save grace, ending with the checkpoint's line.

Real 2-rank launches of ``tests/torchrun_child.py`` (ranks that fail on purpose) and of
``llada-pretrain``; plain torchrun on the same child is the reference for what changes.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from torch.distributed.run import parse_args

from llada_train.cli.torchrun import (
    exit_code,
    failure_line,
    root_failure,
    run_dir_of,
    signal_line,
    with_defaults,
)
from tests.conftest import BIN, REPO
from tests.launch_utils import free_port, launch_env, run

CHILD = "tests.torchrun_child"
BAD_LINE = "error: the one line a rank prints on bad input"


def failure(local_rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
    f = ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file="")
    f.timestamp = timestamp
    return f


def launch(launcher: str, module: str, *args: str):
    cmd = [str(BIN / launcher), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", module,
           *args]
    return run(cmd, timeout=180, check=False)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_root_failure_prefers_bad_input_then_the_first_own_failure():
    # rank 0 stopped by torchrun (SIGTERM) in the same second as rank 1's crash: the crash
    crash = {0: failure(0, -signal.SIGTERM, 10), 1: failure(1, 1, 10)}
    assert root_failure(crash)[0] == 1
    # a bad-input exit wins over an earlier crash (the crash is a consequence)
    mixed = {0: failure(0, 1, 9), 1: failure(1, 2, 10)}
    assert root_failure(mixed)[0] == 1
    # among own failures the earliest, then the lowest rank
    assert root_failure({0: failure(0, 1, 11), 3: failure(3, 1, 10)})[0] == 3
    assert root_failure({2: failure(0, 1, 10), 1: failure(1, 1, 10)})[0] == 1
    # only launcher SIGTERMs (someone signalled torchrun): still one of them
    assert root_failure({0: failure(0, -signal.SIGTERM, 10)})[0] == 0


def test_exit_codes_and_lines_by_hand():
    assert exit_code(failure(0, 2, 0)) == 2
    assert exit_code(failure(0, -signal.SIGKILL, 0)) == 137  # 128 + 9, as a shell reports it
    assert exit_code(failure(0, -signal.SIGSEGV, 0)) == 139
    assert failure_line(0, failure(0, 2, 0), "m") is None  # the rank printed its own line
    host = socket.gethostname()
    assert failure_line(3, failure(1, 1, 0), "m") == (
        f"error: m: rank 3 (local rank 1, pid 1001, host {host}) exited with code 1 "
        "(its traceback is above); the other ranks were stopped"
    )
    assert failure_line(0, failure(0, -signal.SIGSEGV, 0), "m") == (
        f"error: m: rank 0 (local rank 0, pid 1000, host {host}) was killed by SIGSEGV; "
        "the other ranks were stopped"
    )


def test_signal_lines_and_exit_codes_by_hand(tmp_path):
    host, where = socket.gethostname(), tmp_path / "checkpoints"
    assert signal_line(signal.SIGTERM, str(tmp_path), False, 600) == (
        f"[{host}] SIGTERM: training stopped before its first checkpoint in {where}", 0)
    (where / "step_00000005").mkdir(parents=True)
    (where / "step_00000005" / "trainer_state.json").write_text("{}")
    (where / "latest").write_text("step_00000005")
    assert signal_line(signal.SIGUSR1, str(tmp_path), False, 600) == (
        f"[{host}] SIGUSR1: training stopped with checkpoint step_00000005 in {where}; run the "
        "same command to resume", 0)
    assert signal_line(signal.SIGTERM, str(tmp_path), True, 9) == (
        f"[{host}] SIGTERM: the ranks did not exit within 9 s (--shutdown-timeout) and were "
        f"killed; the last complete checkpoint is step_00000005 in {where}", 143)
    assert signal_line(signal.SIGINT, str(tmp_path), False, 600) == (
        f"[{host}] SIGINT: the ranks were stopped; the last complete checkpoint is step_00000005 "
        f"in {where}", 130)


@pytest.mark.slow
def test_bad_input_is_the_ranks_one_line_and_exit_code_2():
    ours = launch("llada-torchrun", CHILD, "bad-input")
    assert ours.returncode == 2, ours.stderr[-3000:]
    assert error_lines(ours.stderr) == [BAD_LINE]
    assert "Traceback" not in ours.stderr and "FAILED" not in ours.stderr, ours.stderr[-3000:]
    # the reference: plain torchrun buries the line under its report and exits 1
    plain = launch("torchrun", CHILD, "bad-input")
    assert plain.returncode == 1
    assert BAD_LINE in plain.stderr and "ChildFailedError" in plain.stderr


@pytest.mark.slow
@pytest.mark.parametrize("lines,printed", [
    (["same", "same"], ["error: same"]),                    # every rank: once
    (["-", "only here"], ["error: only here"]),  # one rank, not rank 0: still said
])
def test_lines_before_the_process_group_print_once_each(lines, printed):
    proc = launch("llada-torchrun", CHILD, "fail", *lines)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == printed, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode,code,how", [
    ("crash", 1, "exited with code 1 (its traceback is above)"),
    ("killed", 137, "was killed by SIGKILL (often the out-of-memory killer"),
])
def test_a_failing_rank_ends_the_run_with_one_line_naming_it(mode, code, how):
    proc = launch("llada-torchrun", CHILD, mode)
    assert proc.returncode == code, proc.stderr[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"error: {CHILD}: rank 1 (local rank 1, pid "), last
    assert how in last and last.endswith("the other ranks were stopped"), last
    assert "ChildFailedError" not in proc.stderr and "closing signal" not in proc.stderr
    if mode == "crash":
        assert "RuntimeError: a bug in rank 1" in proc.stderr  # the rank's own traceback stays


@pytest.mark.slow
def test_data_vocabulary_mismatch_is_one_line_before_any_process_group(tmp_path, demo_data):
    # no tokenizer given: only the shard manifest can tell that ids reach 512
    run_dir = tmp_path / "run"
    proc = launch("llada-torchrun", "llada_train.cli.pretrain", f"run_dir={run_dir}", "data=demo",
                  f"data.path={demo_data / 'shards'}", "data.tokenizer=null", "model.vocab_size=300")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"error: vocabulary mismatch in data source {demo_data / 'shards'}: the data's tokenizer "
        "has 512 ids but the model embeds only 300: use the tokenizer the model was built for, "
        "or set model.vocab_size >= 512"
    )
    assert not (run_dir / "run_info.jsonl").exists()  # written by rank 0 after the process group


def preempt_job(tmp_path, save_s: float, grace_s: str):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cmd = [str(BIN / "llada-torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", CHILD, "preempt", f"run_dir={run_dir}", f"save_s={save_s}"]
    env = {**launch_env(), "LLADA_TERM_GRACE_S": grace_s}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not all((run_dir / f"ready.{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_reaches_the_ranks_and_ends_with_the_checkpoint(tmp_path, sig):
    proc, run_dir = preempt_job(tmp_path, save_s=2.0, grace_s="60")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    host = socket.gethostname()
    assert err.splitlines()[-1] == (
        f"[{host}] {sig.name}: asking the ranks to checkpoint and exit (within 60 s, "
        "--shutdown-timeout)"
    ), err[-3000:]
    assert out.splitlines()[-1] == (
        f"[{host}] {sig.name}: training stopped with checkpoint step_00000007 in "
        f"{run_dir / 'checkpoints'}; run the same command to resume"
    )
    assert "Traceback" not in err and "SignalException" not in err


@pytest.mark.slow
def test_ranks_that_outlive_the_grace_are_killed_with_one_line(tmp_path):
    proc, run_dir = preempt_job(tmp_path, save_s=60.0, grace_s="1")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.splitlines()[-1] == (
        f"[{socket.gethostname()}] SIGTERM: the ranks did not exit within 1 s "
        f"(--shutdown-timeout) and were killed; the last complete checkpoint is none in "
        f"{run_dir / 'checkpoints'}"
    ), err[-3000:]
    assert "Traceback" not in err and "Unable to shutdown" not in err


@pytest.mark.slow
def test_an_error_every_rank_hits_after_the_process_group_prints_once(tmp_path, demo_data):
    # a flipped byte (same size) is caught only by the checksums, which each rank's reader
    # verifies after the process group exists: both ranks fail with the same line
    shards = tmp_path / "shards"
    shutil.copytree(demo_data / "shards", shards)
    shard = shards / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    proc = launch("llada-torchrun", "llada_train.cli.pretrain", f"run_dir={run_dir}", "data=demo",
                  f"data.path={shards}", f"data.tokenizer={demo_data / 'tokenizer.json'}",
                  "data.verify_checksums=true", "trainer.micro_batch_size=8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.fullmatch(
        rf"error: \[rank [01]\] shard {shard} fails its sha256 checksum: the file is corrupted; "
        "re-run the data step", lines[0]), lines[0]
    assert (run_dir / "run_info.jsonl").exists()  # it was after the process group


def test_launcher_defaults_and_what_overrides_them(monkeypatch):
    monkeypatch.delenv("LLADA_TERM_GRACE_S", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    args = with_defaults(parse_args(["-m", "x"]))
    assert args.signals_to_handle == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    assert args.shutdown_timeout == 600
    given = with_defaults(parse_args(["--signals-to-handle=SIGINT", "--shutdown-timeout=7", "x.py"]))
    assert (given.signals_to_handle, given.shutdown_timeout) == ("SIGINT", 7)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")
    assert with_defaults(parse_args(["x.py"])).shutdown_timeout == 45
    monkeypatch.setenv("LLADA_TERM_GRACE_S", "1200")
    assert with_defaults(parse_args(["x.py"])).shutdown_timeout == 1200
    monkeypatch.setenv("LLADA_TERM_GRACE_S", "ten")
    with pytest.raises(SystemExit) as exit_:
        with_defaults(parse_args(["x.py"]))
    assert exit_.value.code == 2


def test_run_dir_is_the_last_override_or_the_task_default():
    assert run_dir_of(parse_args(["-m", "llada_train.cli.sft", "run_dir=a", "x=1", "++run_dir=b"])) == "b"
    assert run_dir_of(parse_args(["-m", "llada_train.cli.pretrain", "x=1"])) == "runs/pretrain"
