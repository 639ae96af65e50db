"""A one-machine SLURM cluster (munged + slurmctld + slurmd) for trying and testing the
cluster path without a cluster. Everything lives under one folder; only the daemons this
script started are stopped, by pid.

    sudo apt-get install -y slurmctld slurmd slurm-client munge     # Debian 12: Slurm 22.05
    python scripts/local_slurm.py start --dir /tmp/llada-slurm      # prints the SLURM_CONF line
    export SLURM_CONF=/tmp/llada-slurm/slurm.conf
    sinfo; sbatch ...; squeue
    python scripts/local_slurm.py stop --dir /tmp/llada-slurm

Runs as root (slurmd must, to start jobs as their user; munged runs as the munge user).
The tests in tests/test_slurm_live.py start and stop the same cluster through ``start`` and
``LocalSlurm.stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = "slurmctld slurmd slurm-client munge"


def missing_programs() -> list[str]:
    """The daemons and clients this cluster needs that are not installed."""
    programs = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
    return [p for p in programs if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class LocalSlurm:
    """A started cluster: its folder, config path and daemon pids."""

    base: Path
    pids: dict[str, int]

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, scontrol...) to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel every job (their processes would outlive the daemons), then SIGTERM each
        daemon this cluster started (slurmd first) and SIGKILL what remains."""
        if self.pids.get("slurmctld") and _alive(self.pids["slurmctld"]):
            self._cancel_jobs(timeout)
        for name in reversed(DAEMONS):
            pid = self.pids.get(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        (self.base / "pids.json").unlink(missing_ok=True)

    def _cancel_jobs(self, timeout: float) -> None:
        env = self.env()
        subprocess.run(["scancel", "--full", "--state=RUNNING"], env=env, capture_output=True)
        subprocess.run(["scancel", "--full", "--state=PENDING"], env=env, capture_output=True)
        deadline = time.monotonic() + timeout + 15  # KillWait, then SIGKILL
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["squeue", "-h", "-t", "R,CG,CF,PD"], env=env, capture_output=True, text=True
            )
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie that is not ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# A requeued job starts again this many seconds (+1) after its requeue; also the lifetime of
# a job-step credential, so it must cover a step launch on a busy node.
CRED_EXPIRE_S = 10


def slurm_conf(base: Path, host: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """A minimal single-node configuration: one partition, requeue allowed, no cgroups.

    KillWait=10: ``scancel`` gives the ranks 10 s between SIGTERM and SIGKILL.
    cred_expire=10 (AuthInfo): a requeued job waits cred_expire + 1 s before it starts again
    (Slurm's default is 120 s), so that the credential of its previous start, revoked on the
    node, has expired by then.
    SchedulerParameters=sched_interval=2: the main scheduling loop tests pending jobs every
    2 s, not 60: a requeued job starts when its begin time has passed, not up to a minute later.
    MinJobAge=600: finished jobs stay visible to ``scontrol show job`` for 10 minutes.
    OverSubscribe=YES:8: jobs submitted with ``--oversubscribe`` may share a CPU, up to 8 of
    them (the tests run nine small jobs side by side, two of them on one run_dir).
    The job completion log (jobcomp.txt) has one line per ended run of a job, requeues
    included, so a test can count starts without accounting storage.
    """
    return f"""\
ClusterName=llada-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={base}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc={base}/jobcomp.txt
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=local Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES:8
"""


def _start_munge(base: Path) -> int:
    munge = pwd.getpwnam("munge")
    mdir = base / "munge"
    mdir.mkdir(mode=0o700)
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (mdir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    cmd = [
        _program("munged"),
        "--foreground",
        "--force",
        f"--socket={mdir}/munge.socket",
        f"--key-file={key}",
        f"--pid-file={mdir}/munged.pid",
        f"--log-file={mdir}/munged.log",
        f"--seed-file={mdir}/munged.seed",
    ]
    proc = subprocess.Popen(
        ["runuser", "-u", "munge", "--", *cmd],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(base / "log" / "munged.err", "wb"),  # noqa: SIM115
    )
    _wait_for(lambda: (mdir / "munge.socket").exists(), 20, "munged's socket", base)
    return proc.pid


def _wait_for(ready, timeout: float, what: str, base: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.25)
    raise RuntimeError(f"local SLURM: {what} not ready after {timeout:.0f} s (logs in {base}/log)")


def node_state(env: dict[str, str]) -> str:
    """The node's state as sinfo prints it ("idle", "down*", ...), "" when unreachable."""
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def start(base: Path, cpus: int = 2) -> LocalSlurm:
    """Write the config under ``base`` (created empty), start the three daemons, and return
    once ``sinfo`` shows the node idle. Raises RuntimeError naming the log on failure."""
    if missing := missing_programs():
        raise RuntimeError(f"local SLURM needs {', '.join(missing)}: apt-get install -y {PACKAGES}")
    if os.geteuid() != 0:
        raise RuntimeError("local SLURM must be started as root (slurmd starts jobs as their user)")
    base = base.resolve()
    if base.exists() and any(base.iterdir()):
        raise RuntimeError(
            f"local SLURM: {base} is not empty: stop that cluster or pick another --dir"
        )
    for sub in ("state", "spool", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    (base / "slurm.conf").write_text(slurm_conf(base, host, cpus, _free_port(), _free_port()))
    cluster = LocalSlurm(base, {})
    try:
        cluster.pids["munged"] = _start_munge(base)
        env = cluster.env()
        for name in ("slurmctld", "slurmd"):
            log = open(base / "log" / f"{name}.err", "wb")  # noqa: SIM115
            proc = subprocess.Popen(
                [_program(name), "-D", "-f", str(cluster.conf)],
                env=env,
                start_new_session=True,
                stdout=log,
                stderr=log,
            )
            cluster.pids[name] = proc.pid
            if name == "slurmctld":
                _wait_for(lambda: node_state(env) != "", 60, "slurmctld", base)
        _wait_for(lambda: node_state(env) == "idle", 90, "the node (sinfo: idle)", base)
    except BaseException:
        cluster.stop()
        raise
    (base / "pids.json").write_text(json.dumps(cluster.pids))
    return cluster


def main(argv: list[str] | None = None) -> int:
    """``start`` or ``stop`` a cluster in ``--dir``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llada-slurm"))
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    base = args.dir.resolve()
    if args.action == "stop":
        pids_file = base / "pids.json"
        if not pids_file.exists():
            print(
                f"error: no cluster started by this script in {base} ({pids_file} is missing)",
                file=sys.stderr,
            )
            return 2
        LocalSlurm(base, json.loads(pids_file.read_text())).stop()
        print(f"local SLURM in {base} stopped")
        return 0
    try:
        start(base, args.cpus)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"local SLURM up ({args.cpus} CPUs); for the clients:\n  export SLURM_CONF={base}/slurm.conf"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
