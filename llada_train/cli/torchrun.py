"""``llada-torchrun``: torchrun (same arguments, same elastic launcher) that ends a run with
one line instead of torchrun's reports.

- A rank that stops on bad input prints one ``error:`` line and exits 2 (``cli/common.py``);
  plain torchrun buries that line under a ``ChildFailedError`` traceback and exits 1. Here
  the run exits 2 and adds nothing. Any other failure (a crash, a signal) gets one line
  naming the first failing rank and its exit code or signal; the exit code is the rank's
  (128 + N for signal N).
- SIGTERM or SIGUSR1 (pre-emption) is passed to the ranks, which checkpoint at the end of
  their step and exit; they get ``--shutdown-timeout`` seconds (default ``LLADA_TERM_GRACE_S``,
  else 600: the time an 8B checkpoint needs on a slow file system; plain torchrun gives 30
  and does not pass SIGUSR1 on). The run ends with one line naming the checkpoint and exit
  code 0, or 128 + N when the ranks had to be killed (or on SIGINT, SIGHUP, SIGQUIT).

    llada-torchrun --nproc_per_node 8 -m llada_train.cli.pretrain model=llada_1b run_dir=runs/1b
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from argparse import Namespace
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import get_args_parser, parse_args, run

from llada_train.errors import LladaError
from llada_train.train.checkpointing import checkpoint_dir, latest_tag

BAD_INPUT_EXIT = 2  # cli/common.py::_fail: the rank has printed its one line
PREEMPTION = (signal.SIGTERM, signal.SIGUSR1)  # the trainer checkpoints and exits on these
DEFAULT_GRACE_S = 600
ELASTIC_LOGGERS = (
    "torch.distributed.elastic.multiprocessing.api",
    "torch.distributed.elastic.agent.server.api",
)


class TeardownReport(logging.Filter):
    """Replaces torchrun's narration of a failure or a signal with the lines here, and notes
    whether ranks had to be killed after the shutdown timeout. Other records pass."""

    def __init__(self, grace_s: int) -> None:
        super().__init__()
        self.grace_s = grace_s
        self.killed = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Received %s death signal"):
            sig = signal.Signals(record.args[0])  # type: ignore[index]
            what = "checkpoint and exit" if sig in PREEMPTION else "stop"
            print(f"[{socket.gethostname()}] {sig.name}: asking the ranks to {what} (within "
                  f"{self.grace_s} s, --shutdown-timeout)", file=sys.stderr, flush=True)
            return False
        if msg.startswith("Unable to shutdown process"):
            self.killed = True
            return False
        return not msg.startswith(("failed (exitcode:", "Sending process"))


def with_defaults(args: Namespace) -> Namespace:
    """Ours where the user left torchrun's: SIGUSR1 handled too, and a shutdown grace of
    ``LLADA_TERM_GRACE_S`` (else torchrun's ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, else 600 s)."""
    if args.signals_to_handle == get_args_parser().get_default("signals_to_handle"):
        args.signals_to_handle += ",SIGUSR1"
    if args.shutdown_timeout is None:
        for var in ("LLADA_TERM_GRACE_S", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
            value = os.environ.get(var)
            if value is not None:
                if not value.strip().isdigit():
                    print(f"error: {var}={value!r} is not a number of seconds: set it to e.g. "
                          f"{DEFAULT_GRACE_S}", file=sys.stderr)
                    sys.exit(BAD_INPUT_EXIT)
                args.shutdown_timeout = int(value)
                break
        else:
            args.shutdown_timeout = DEFAULT_GRACE_S
    return args


def run_dir_of(args: Namespace) -> str:
    """The ``run_dir=`` of the training overrides (Hydra: the last wins), else the task's
    default (``runs/pretrain``, ``runs/sft``)."""
    found = [m[1] for a in args.training_script_args if (m := re.match(r"\+{0,2}run_dir=(.*)", a))]
    task = args.training_script if args.module else Path(args.training_script).stem
    return found[-1] if found else f"runs/{task.rsplit('.', 1)[-1]}"


def exit_code(failure: ProcessFailure) -> int:
    """The shell's convention: the rank's exit code, or 128 + N when signal N killed it."""
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


def root_failure(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The failure that ended the run: a bad-input exit if any rank had one, else the first
    failure that is not torchrun's own SIGTERM to the survivors (timestamps are whole seconds)."""
    bad_input = {r: f for r, f in failures.items() if f.exitcode == BAD_INPUT_EXIT}
    own = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM}
    pool = bad_input or own or failures
    rank = min(pool, key=lambda r: (pool[r].timestamp, r))
    return rank, pool[rank]


def failure_line(rank: int, failure: ProcessFailure, entrypoint: str) -> str | None:
    """The one line that ends a failed run; None when the rank printed its own (bad input)."""
    if failure.exitcode == BAD_INPUT_EXIT:
        return None
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
        if failure.exitcode == -signal.SIGKILL:
            how += " (often the out-of-memory killer: see `dmesg` or the job's memory limit)"
    else:
        how = f"exited with code {failure.exitcode} (its traceback is above)"
    return (
        f"error: {entrypoint}: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}, "
        f"host {socket.gethostname()}) {how}; the other ranks were stopped"
    )


def signal_line(sig: signal.Signals, run_dir: str, killed: bool, grace_s: int) -> tuple[str, int]:
    """The line and exit code that end a run stopped by ``sig``."""
    where = checkpoint_dir(run_dir)
    latest = latest_tag(run_dir)
    head = f"[{socket.gethostname()}] {sig.name}:"
    if sig in PREEMPTION and not killed:
        if latest is None:  # stopped while starting: nothing trained, nothing to save
            return f"{head} training stopped before its first checkpoint in {where}", 0
        return (f"{head} training stopped with checkpoint {latest} in {where}; run the same "
                "command to resume"), 0
    last = f"the last complete checkpoint is {latest or 'none'} in {where}"
    if killed:
        return (f"{head} the ranks did not exit within {grace_s} s (--shutdown-timeout) and "
                f"were killed; {last}"), 128 + sig
    return f"{head} the ranks were stopped; {last}", 128 + sig


def main(argv: list[str] | None = None) -> None:
    """Run torchrun with ``argv``; end with at most one line and the exit code above."""
    args = with_defaults(parse_args(argv))
    report = TeardownReport(args.shutdown_timeout)
    for name in ELASTIC_LOGGERS:
        logging.getLogger(name).addFilter(report)
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = root_failure(err.failures)
        line = failure_line(rank, failure, err.name)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        sys.exit(exit_code(failure))
    except SignalException as exc:
        try:
            line, code = signal_line(exc.sigval, run_dir_of(args), report.killed,
                                     args.shutdown_timeout)
        except LladaError as bad:  # e.g. a `latest` naming a step that is not there
            line, code = f"error: {bad}", BAD_INPUT_EXIT
        print(line, file=sys.stderr if code else sys.stdout, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
