"""Shared test fixtures: repo paths, the shared data folder, DeepSpeed /dev/shm cleanup."""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent  # console scripts of the environment running the tests

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One thread per test process (read by torch at import, which comes after this file): `make
# test` runs two workers on two cores beside the subprocesses they launch, and more OpenMP
# threads than cores spin-wait on each other
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; skips with a reason when the checkout has no shared folder beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (real-data tests need ../shared/data)")
    return SHARED_DATA


def _is_xdist_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


def pytest_sessionstart(session) -> None:
    """Note DeepSpeed's /dev/shm files before the run (in the main process only)."""
    if not _is_xdist_worker():
        session.config._shm_before = set(glob.glob("/dev/shm/deepspeed_*"))


def pytest_sessionfinish(session, exitstatus) -> None:
    """DeepSpeed's CPU all-reduce leaves 66 MiB /dev/shm files per rank and port; remove ours.

    Done by the main process after every xdist worker has finished, so no worker's live
    files are removed under it.
    """
    before = getattr(session.config, "_shm_before", None)
    if before is None or _is_xdist_worker():
        return
    for f in set(glob.glob("/dev/shm/deepspeed_*")) - before:
        with contextlib.suppress(OSError):
            os.remove(f)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The built-in demo corpus, tokenizer, shards and SFT records (made once per session)."""
    from data_pipelines.demo import prepare_demo

    out = tmp_path_factory.mktemp("demo") / "data"
    prepare_demo(out)
    return out


# The modules that take longest (measured with --durations), run first: `make test` hands
# whole modules to its two workers (--dist loadscope, so a module's fixtures are built once),
# and starting the long ones early keeps one worker from finishing alone with a long tail.
LONGEST_FIRST = [
    "test_slurm_live.py",
    "test_sft.py",
    "test_train_distributed.py",
    "test_lora_e2e.py",
    "test_vrpo_train.py",
    "test_rl_train.py",
    "test_checkpoint_security.py",
    "test_benchmarks_smoke.py",
    "test_moe_bias_zero3.py",
    "test_loss_zero3.py",
    "test_masks_topology.py",
    "test_block_train.py",
    "test_moe_train.py",
    "test_launch.py",
    "test_paper_mini.py",
    "test_torchrun.py",
]


def pytest_collection_modifyitems(session, config, items) -> None:
    """Reorder by LONGEST_FIRST (stable: the other modules keep their order after them)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
