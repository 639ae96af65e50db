"""A broken ``model.safetensors`` in a model folder (``init_from``, the samplers) is one line
that names the file, never safetensors' bare error or a traceback, and is never unpickled."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from llada_train.errors import LladaError
from llada_train.model.checkpoint import SINGLE_NAME, load_pretrained, read_config, save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.model.transformer import LLaDAModel
from llada_train.train.build import check_init_from
from tests.launch_utils import cli, one_error_line
from tests.test_checkpoint_security import Payload


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=64)
    model = LLaDAModel(cfg)
    return save_pretrained(model.state_dict(), cfg, tmp_path_factory.mktemp("m") / "model")


def broken(good: Path, tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "config.json").write_bytes((good / "config.json").read_bytes())
    data = (good / SINGLE_NAME).read_bytes()
    payload = {
        "truncated": data[: len(data) // 2],
        "truncated_header": data[:100],
        "empty": b"",
        "torch_save": None,
        "pickle": pickle.dumps(Payload(tmp_path / "ran"), protocol=2),
    }[kind]
    if kind == "torch_save":
        torch.save({"w": Payload(tmp_path / "ran")}, folder / SINGLE_NAME)
    else:
        (folder / SINGLE_NAME).write_bytes(payload)
    return folder


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("truncated", "(incomplete metadata, file not fully covered)"),
        ("truncated_header", "(invalid header length)"),
        ("empty", "(header too small)"),
        ("torch_save", "(a PyTorch/pickle file, header too large)"),
        ("pickle", "(a PyTorch/pickle file, header too large)"),
    ],
)
def test_broken_safetensors_is_one_line_naming_the_file(good_folder, tmp_path, kind, reason):
    folder = broken(good_folder, tmp_path, kind)
    with pytest.raises(LladaError) as err:
        load_pretrained(folder)
    assert str(err.value) == (
        f"{folder / SINGLE_NAME} is not a readable safetensors file {reason}: it is truncated, "
        "corrupt or another format; copy it again, or convert it with safetensors' save_file"
    )
    assert not (tmp_path / "ran").exists()


def test_init_from_a_pickle_named_safetensors_is_one_clear_line(good_folder, demo_data, tmp_path):
    folder = broken(good_folder, tmp_path, "pickle")
    proc = cli(
        "llada-pretrain",
        [f"run_dir={tmp_path / 'run'}", f"data.path={demo_data / 'shards'}",
         f"data.tokenizer={demo_data / 'tokenizer.json'}", f"init_from={folder}",
         "trainer.max_steps=1", "trainer.seq_len=32", "logging.progress_bar=false"],
        check=False,
    )
    line = one_error_line(proc)
    assert line.startswith(f"error: {folder / SINGLE_NAME} is not a readable safetensors file")
    assert not (tmp_path / "ran").exists()
    # found from the headers before any process group (rank 0 writes run_info.jsonl after it)
    assert not (tmp_path / "run" / "run_info.jsonl").exists()


def test_a_truncated_shard_index_is_one_line(good_folder, tmp_path):
    folder = tmp_path / "sharded"
    cfg = read_config(good_folder)
    save_pretrained(LLaDAModel(cfg).state_dict(), cfg, folder, max_shard_bytes=20_000)
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(LladaError, match=f"^{index} is not a valid safetensors index"):
        load_pretrained(folder)


def test_weights_that_do_not_fit_config_json_are_found_from_the_headers(good_folder, tmp_path):
    folder = tmp_path / "mismatch"
    folder.mkdir()
    (folder / SINGLE_NAME).write_bytes((good_folder / SINGLE_NAME).read_bytes())
    cfg = read_config(good_folder)
    check_init_from(cfg, str(good_folder))  # the real pair passes
    wider = dataclasses.replace(cfg, mlp_hidden_size=96)  # what a wrong config.json would say
    with pytest.raises(LladaError) as err:
        check_init_from(wider, str(folder))
    assert str(err.value) == (
        f"{folder / SINGLE_NAME}: model.transformer.blocks.0.ff_proj.weight has shape (64, 32) but "
        "config.json implies (96, 32); config.json does not match the weights"
    )
