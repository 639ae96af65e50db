"""Run an entry point's ``main`` on many command lines that must stop at start-up, one
interpreter for all of them: ``python -m tests.start_failures MODULE CASES OUT``.

``CASES`` is a JSON list of argument lists. The module (torch, DeepSpeed, Hydra) is imported
once; each case then runs in a fork of this process, from ``main()`` on with its own
``sys.argv``, its stdout and stderr in ``OUT/<i>.log``, its exit status as Python's would be.
That is the user's path from the command line on, at the cost of one import instead of one
per case. ``OUT/codes.json`` lists the exit codes.

A fork is safe only from a process with one thread (a lock held by another thread at the
fork stays held in the child), so this refuses to fork from more.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

CASE_TIMEOUT_S = 120  # a case that does not stop at start-up is killed, not waited on


def run_case(main, module: str, argv: list[str], log: Path) -> int:
    """``main()`` under ``argv`` in a forked child; its exit code (negative: killed by a signal)."""
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise SystemExit(f"error: {len(threads)} threads after importing {module}: no safe fork")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the loop below
        code = 1
        try:
            signal.alarm(CASE_TIMEOUT_S)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = [module, *argv]
            try:
                main()
                code = 0
            except SystemExit as exc:  # as the interpreter turns sys.exit(x) into a status
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def start_failures(module: str, cases: list[list[str]], out: Path) -> list[tuple[int, str]]:
    """(exit code, output) of ``python -m module`` on each argument list of ``cases``, all run
    by one launch of this file (the test side). Each output starts with what the shared
    import printed, as a user's launch would show it."""
    from tests.conftest import REPO  # the test side's imports: the forking process needs neither
    from tests.launch_utils import launch_env

    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", __name__, module, str(out / "cases.json"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=CASE_TIMEOUT_S * (len(cases) + 1))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = json.loads((out / "codes.json").read_text())
    shared = proc.stdout + proc.stderr
    return [(code, shared + (out / f"{i}.log").read_text()) for i, code in enumerate(codes)]


def main() -> None:
    module, cases, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    entry = importlib.import_module(module).main
    codes = [run_case(entry, module, argv, out / f"{i}.log") for i, argv in enumerate(cases)]
    (out / "codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    main()
