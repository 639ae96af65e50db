"""``llada-sft`` refuses at start, with one line and before anything is written: records longer
than the model's ``max_sequence_length``, and a missing ``init_from`` (``init_from=none`` is
the explicit way to fine-tune random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llada_train.data.sft import check_record_lengths, load_sft_manifest
from llada_train.errors import LladaError
from tests.launch_utils import cli

QUICK = ["logging.log_every=1", "logging.progress_bar=false", "trainer.epochs=0",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "schedule=sft_demo"]


def lengths(records) -> np.ndarray:
    m = json.loads((records / "manifest.json").read_text())
    f = m["files"]["offsets"]
    return np.diff(np.fromfile(records / f["file"], dtype=f["dtype"]).astype(np.int64))


def record_line(records, limit: int) -> str:
    n = lengths(records)
    i = int(np.flatnonzero(n > limit)[0])
    return (
        f"SFT record {i} of {records} has {n[i]} tokens, more than the model's "
        f"max_sequence_length={limit} ({int((n > limit).sum())} such records): rebuild the "
        f"records with llada-sft-data --max-length {limit}"
    )


def sft(run_dir, demo_data, *extra: str):
    return cli("llada-sft", [f"run_dir={run_dir}", f"data.path={demo_data / 'sft'}",
                             f"data.tokenizer={demo_data / 'tokenizer.json'}", *QUICK, *extra],
               check=False)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_record_length_check_names_the_first_long_record(demo_data):
    records = demo_data / "sft"
    longest = int(lengths(records).max())
    manifest = load_sft_manifest(records)
    check_record_lengths(manifest, str(records), longest)  # fits exactly
    with pytest.raises(LladaError) as err:
        check_record_lengths(manifest, str(records), longest - 10)
    assert str(err.value) == record_line(records, longest - 10)


def test_sft_without_init_from_is_refused_before_anything_is_written(tmp_path, demo_data):
    proc = sft(tmp_path / "r", demo_data, "trainer.seq_len=256")
    assert one_error_line(proc) == (
        "error: llada-sft needs init_from=<model folder> (our pretraining export or a local "
        "LLaDA-8B-Base): set it, or init_from=none to fine-tune random weights on purpose"
    )
    assert not (tmp_path / "r" / "run_info.jsonl").exists()


def test_records_longer_than_the_model_are_refused_before_anything_is_written(
    tmp_path, demo_data
):
    proc = sft(tmp_path / "r", demo_data, "init_from=none", "model.max_sequence_length=64",
               "trainer.seq_len=64")
    assert one_error_line(proc) == "error: " + record_line(demo_data / "sft", 64)
    assert not (tmp_path / "r" / "run_info.jsonl").exists()


def test_init_from_none_fine_tunes_random_weights(tmp_path, demo_data):
    run_dir = tmp_path / "r"
    proc = sft(run_dir, demo_data, "init_from=none", "trainer.seq_len=256",
               "trainer.max_steps=1", "trainer.export_at_end=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file()
