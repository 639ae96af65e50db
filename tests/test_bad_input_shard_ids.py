"""A corrupt shard (checksums off) holding an id past the model's vocabulary is one line naming
the shard file and token offset, never the embedding's ``IndexError``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llada_train.cli.common import _one_line
from llada_train.data import PretrainDataConfig, build_pretrain_reader
from llada_train.errors import LladaError
from tests.conftest_data import write_shard_set
from tests.launch_utils import cli


def line_for(path, offset: int, token: int, vocab: int) -> str:
    return (
        f"shard {path} holds token id {token} at token offset {offset}, outside the model's "
        f"vocabulary of {vocab} ids: the shard is corrupt; re-tokenize it "
        "(data.verify_checksums=true checks every shard at start)"
    )


def corrupt_set(folder, bad_at: int, token: int = 999):
    """Two shards of 100 ids < 50 each, one id at stream position ``bad_at`` set to ``token``."""
    stream = np.arange(200) % 50
    stream[bad_at] = token
    return write_shard_set(folder, [stream[:100], stream[100:]], vocab_size=50)


def read_all(folder, vocab: int | None, num_workers: int = 0, val_fraction: float = 0.0):
    cfg = PretrainDataConfig(
        path=str(folder), tokenizer=None, num_workers=num_workers, val_fraction=val_fraction
    )
    reader, info = build_pretrain_reader(cfg, 16, 2, seed=0, rank=0, world_size=1,
                                         vocab_size=vocab)
    try:
        return [next(reader)["input_ids"].clone() for _ in range(12)], info  # over an epoch
    finally:
        reader.close()


@pytest.mark.parametrize("bad_at,shard,offset", [(37, 0, 37), (137, 1, 37), (100, 1, 0)])
def test_id_past_the_vocabulary_names_shard_and_offset(tmp_path, bad_at, shard, offset):
    corrupt_set(tmp_path, bad_at)
    with pytest.raises(LladaError) as err:
        read_all(tmp_path, vocab=64)
    assert str(err.value) == line_for(tmp_path / f"shard_{shard:05d}.bin", offset, 999, 64)


def test_ids_inside_the_vocabulary_read_as_before(tmp_path):
    corrupt_set(tmp_path, 37, token=63)  # the largest id the model embeds
    checked, _ = read_all(tmp_path, vocab=64)
    plain, _ = read_all(tmp_path, vocab=None)
    assert all((a == b).all() for a, b in zip(checked, plain, strict=True))
    assert max(int(x.max()) for x in checked) == 63


def test_validation_windows_are_checked_too(tmp_path):
    corrupt_set(tmp_path, 180)  # in window 11 of 12: held out for validation, never trained on
    cfg = PretrainDataConfig(path=str(tmp_path), tokenizer=None, val_fraction=0.1)
    _, info = build_pretrain_reader(cfg, 16, 2, seed=0, rank=0, world_size=1, vocab_size=64)
    with pytest.raises(LladaError, match=r"shard_00001.bin holds token id 999 at token offset 80"):
        info.validation.take(info.validation.size)


def test_error_from_a_dataloader_worker_is_still_one_line(tmp_path):
    corrupt_set(tmp_path, 137)
    with pytest.raises(LladaError) as err:
        read_all(tmp_path, vocab=64, num_workers=1)
    assert "Traceback" in str(err.value)  # torch wraps it; the entry point prints the line alone
    assert _one_line(err.value) == line_for(tmp_path / "shard_00001.bin", 37, 999, 64)


def test_pretrain_cli_stops_with_the_line(tmp_path, demo_data):
    shards = tmp_path / "shards"
    shutil.copytree(demo_data / "shards", shards)
    m = json.loads((shards / "manifest.json").read_text())
    first = shards / m["shards"][0]["file"]
    ids = np.fromfile(first, dtype=m["dtype"])
    ids[5] = 40000  # within uint16, far past the 512-id demo vocabulary
    ids.tofile(first)
    proc = cli(
        "llada-pretrain",
        [f"run_dir={tmp_path / 'r'}", f"data.path={shards}",
         f"data.tokenizer={demo_data / 'tokenizer.json'}", "trainer.max_steps=400",
         "trainer.seq_len=64"],  # with the progress bar: the line must still start a line
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "IndexError" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: " + line_for(first, 5, 40000, 512)], proc.stderr[-3000:]
