"""Clear one-line errors: damaged shards, vocab/tokenizer mismatch, bad state, short data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llada_train.data import PretrainDataConfig, build_pretrain_reader, check_vocab
from llada_train.errors import LladaError
from tests.conftest_data import counting_shards, run_py


def build(path, **kw):
    cfg = PretrainDataConfig(path=str(path), tokenizer=kw.pop("tokenizer", None), **kw)
    return build_pretrain_reader(cfg, 16, 2, seed=0, rank=0, world_size=1)[0]


def test_truncated_shard_names_file_and_sizes(tmp_path):
    counting_shards(tmp_path, [100, 100])
    shard = tmp_path / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(
        LladaError, match=rf"shard {shard} has 394 bytes, manifest says 400 \(100 x uint32\)"
    ):
        build(tmp_path)


def test_missing_shard(tmp_path):
    counting_shards(tmp_path, [100, 100])
    (tmp_path / "shard_00000.bin").unlink()
    with pytest.raises(LladaError, match=r"shard .*shard_00000.bin is missing"):
        build(tmp_path)


def test_corrupted_shard_caught_by_checksum_only_on_request(tmp_path):
    counting_shards(tmp_path, [100])
    shard = tmp_path / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    assert build(tmp_path).sched.sizes == [6]  # size checks pass
    with pytest.raises(LladaError, match=r"shard_00000.bin fails its sha256 checksum"):
        build(tmp_path, verify_checksums=True)


def test_bad_dtype_and_missing_manifest(tmp_path):
    counting_shards(tmp_path / "d", [100])
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({**m, "dtype": "float32"}))
    with pytest.raises(LladaError, match=r"dtype 'float32' is not one of uint16, uint32"):
        build(tmp_path / "d")
    with pytest.raises(LladaError, match=r"nowhere/manifest.json not found"):
        build(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "progress.json").write_text("{}")
    with pytest.raises(LladaError, match=r"unfinished tokenization: run llada-tokenize again"):
        build(tmp_path / "half")


def test_vocab_mismatch_with_model():
    check_vocab(512, 512, "x")  # fits
    with pytest.raises(
        LladaError,
        match=r"vocabulary mismatch in data runs/x: the data's tokenizer has 126349 ids "
        r"but the model embeds only 512",
    ):
        check_vocab(126349, 512, "in data runs/x")


def test_tokenizer_mismatch(demo_data, tmp_path):
    shards = demo_data / "shards"
    cfg = PretrainDataConfig(path=str(shards), tokenizer=str(demo_data / "tokenizer.json"))
    _, info = build_pretrain_reader(cfg, 16, 2, seed=0, rank=0, world_size=1)
    assert info.vocab_size == 512
    other = tmp_path / "tokenizer.json"
    other.write_text(
        (demo_data / "tokenizer.json").read_text().replace('"<|mdm_mask|>"', '"<|mask|>"')
    )
    with pytest.raises(
        LladaError,
        match=r"tokenizer mismatch in data source .*is not the tokenizer the data was made with",
    ):
        build(shards, tokenizer=str(other))


def test_sequence_longer_than_data(tmp_path):
    counting_shards(tmp_path, [10])
    with pytest.raises(LladaError, match=r"has 10 tokens, fewer than seq_len=16"):
        build(tmp_path)


def test_state_from_other_data_is_refused(tmp_path):
    counting_shards(tmp_path / "a", [100])
    counting_shards(tmp_path / "b", [200])
    state = build(tmp_path / "a").state_dict()
    with pytest.raises(
        LladaError, match=r"state does not match this data/seed \(differs in: sizes, shards\)"
    ):
        build(tmp_path / "b").load_state_dict(state)


def test_cli_error_is_one_line(demo_data, tmp_path):
    res = run_py(
        [
            "-m",
            "data_pipelines.tokenize",
            "--input",
            str(tmp_path / "none.txt"),
            "--tokenizer",
            str(demo_data),
            "--out",
            str(tmp_path / "o"),
        ],
        check=False,
    )
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"error: input {tmp_path / 'none.txt'} not found: pass existing files, folders or a glob"
    )
    assert np.all([not p.exists() for p in (tmp_path / "o").glob("shard_*")])
