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
