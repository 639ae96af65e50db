"""Many launches of one entry point after one import: ``forked_launches(module, cases, out)``.

A launch is ``python -m MODULE ARGV``; most of its CPU is the imports (torch, DeepSpeed, Hydra)
before ``main``. Here one single-threaded interpreter (``python -m tests.forked_launches``)
imports the module (and ``preload``) but runs nothing; each case is then a fork of it that runs
``main()`` under its own ``sys.argv``, writes stdout and stderr to ``OUT/<i>.log`` and ends as
an interpreter does (an exception prints its traceback, ``SystemExit`` gives the status, atexit
handlers run): what the user's launch does after its imports. Cases run in order.

A case is ``{"argv": [...]}`` plus, optionally, ``"branch": [run, step, dst]`` (first make
``dst`` with ``launch_utils.branch_at``, after the case that wrote ``run`` ended) and ``"exec"``
(code run in the case's process before ``main``).

A fork is safe only from a process with one thread (a lock held by another thread at the fork
stays held in the child), so the driver refuses to fork from more.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# what every training launch imports inside ``main`` (DeepSpeed's engine pulls in torch's
# compiler stack): imported once before the forks, each case's CPU is little more than its work
PRELOAD = ("deepspeed", "torch._inductor.compile_fx")


def forked_launches(
    module: str,
    cases: list[dict],
    out: Path,
    preload: tuple[str, ...] = PRELOAD,
    timeout_s: int = 300,
) -> list[tuple[int | None, str]]:
    """(exit code, output) of each case, all run by one launch of this file after importing
    ``module`` and ``preload``; each output starts with what the shared imports printed, as a
    user's launch would show it. A case whose ``branch`` failed has code None."""
    from tests.conftest import REPO  # the test side's imports: the forking process needs neither
    from tests.launch_utils import launch_env

    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", __name__, module, str(out), str(timeout_s), *preload]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=timeout_s * (len(cases) + 1))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    codes = json.loads((out / "codes.json").read_text())
    shared = proc.stdout + proc.stderr
    return [(code, shared + (out / f"{i}.log").read_text()) for i, code in enumerate(codes)]


def launched(result: tuple[int | None, str]) -> subprocess.CompletedProcess:
    """A case's result as ``launch_utils.run(check=False)`` gives it (stdout and stderr as one)."""
    code, out = result
    return subprocess.CompletedProcess([], code, out, out)


def _branch(case: dict, log: Path) -> bool:
    from tests.launch_utils import branch_at

    src, step, dst = case["branch"]
    try:
        branch_at(Path(src), step, Path(dst), with_metrics=False)
    except OSError as exc:  # the run it branches from failed: this case fails, not the rest
        log.write_text(f"no branch of {src} at step {step}: {exc}")
        return False
    return True


def _run_case(main, module: str, case: dict, log: Path, timeout_s: int) -> int:
    """Fork; the child runs the case and ends its interpreter, the parent returns its status."""
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise SystemExit(f"error: {len(threads)} threads after importing {module}: no safe fork")
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:  # the case: leaves this function only by ending the interpreter
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        signal.alarm(timeout_s)  # a case that hangs is killed, not waited on
        sys.argv = [module, *case["argv"]]
        exec(case.get("exec", ""))
        main()
        sys.exit(0)
    return os.waitstatus_to_exitcode(os.wait()[1])


def main() -> None:
    module, out, timeout_s = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    cases = json.loads((out / "cases.json").read_text())
    for name in sys.argv[4:]:
        importlib.import_module(name)
    entry = importlib.import_module(module).main
    codes: list[int | None] = []
    for i, case in enumerate(cases):
        log = out / f"{i}.log"
        ok = "branch" not in case or _branch(case, log)
        codes.append(_run_case(entry, module, case, log, timeout_s) if ok else None)
    (out / "codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    main()
