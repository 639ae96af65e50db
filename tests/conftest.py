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


@pytest.fixture(autouse=True, scope="session")
def _clean_deepspeed_shm():
    """DeepSpeed's CPU all-reduce leaves 66 MiB /dev/shm files per rank and port; remove ours."""
    before = set(glob.glob("/dev/shm/deepspeed_*"))
    yield
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
