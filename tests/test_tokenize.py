"""llada-tokenize: exact token streams, sharding, parallel = serial, input kinds, errors, resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipelines.sources import SourceSpec
from data_pipelines.tokenize import tokenize_to_shards
from data_pipelines.train_tokenizer import SPECIAL_TOKENS, save_tokenizer, train_bpe
from llada_train.errors import LladaError
from tests.conftest_data import run_py, shared_file
from tests.launch_utils import cli


def read_stream(folder) -> tuple[dict, np.ndarray]:
    m = json.loads((folder / "manifest.json").read_text())
    parts = [np.fromfile(folder / s["file"], dtype=m["dtype"]) for s in m["shards"]]
    return m, np.concatenate(parts)


def shard_bytes(folder) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("shard_*.bin"))]


def test_shards_equal_reference_stream_and_parallel_equals_serial(demo_data, tmp_path):
    tok_path = str(demo_data / "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    spec = SourceSpec(inputs=[str(demo_data / "corpus")], txt_doc="line")
    m1 = tokenize_to_shards(
        spec,
        tok_path,
        tmp_path / "a",
        shard_tokens=10_007,
        num_workers=1,
        add_bos=True,
        progress=False,
        chunk_docs=97,
    )
    m2 = tokenize_to_shards(
        spec,
        tok_path,
        tmp_path / "b",
        shard_tokens=10_007,
        num_workers=2,
        add_bos=True,
        progress=False,
        chunk_docs=64,
    )
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    docs = [
        x for p in sorted((demo_data / "corpus").glob("*.txt")) for x in p.read_text().splitlines()
    ]
    ref = np.concatenate([np.asarray([0] + tok.encode(d).ids + [1]) for d in docs])  # BOS doc EOS
    m, stream = read_stream(tmp_path / "a")
    assert np.array_equal(stream, ref)
    sizes = [s["num_tokens"] for s in m1["shards"]]
    assert (
        sizes[:-1] == [10_007] * (len(sizes) - 1)
        and 0 < sizes[-1] <= 10_007
        and sum(sizes) == len(ref)
    )
    assert m1["num_documents"] == len(docs) and m1["bos_id"] == 0 and m1["add_bos"] is True
    assert m2["shards"] == m1["shards"]  # same sha256 per shard


def test_exit_mid_run_resumes_byte_identical(demo_data, tmp_path):
    args = [
        "-m",
        "data_pipelines.tokenize",
        "--input",
        str(demo_data / "corpus"),
        "--txt-doc",
        "line",
        "--tokenizer",
        str(demo_data / "tokenizer.json"),
        "--shard-tokens",
        "20000",
        "--no-progress",
        "--num-workers",
        "2",
    ]
    run_py([*args, "--out", str(tmp_path / "full")])
    # crash right after shard 3 is renamed into place but before progress.json records it
    res = run_py(
        [*args, "--out", str(tmp_path / "cut")],
        env={"LLADA_TOKENIZE_EXIT_AFTER_SHARDS": "3"},
        check=False,
    )
    assert res.returncode == 75
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert len(progress["shards"]) == 2 and (tmp_path / "cut" / "shard_00002.bin").exists()
    assert not (tmp_path / "cut" / "manifest.json").exists()
    run_py([*args, "--out", str(tmp_path / "cut")])
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "full")
    assert len(shard_bytes(tmp_path / "full")) == 13
    full = json.loads((tmp_path / "full" / "manifest.json").read_text())
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert cut["shards"] == full["shards"] and cut["num_documents"] == full["num_documents"] == 6000
    assert not (tmp_path / "cut" / "progress.json").exists()
    again = run_py([*args, "--out", str(tmp_path / "cut")])  # complete: a rerun does nothing
    assert "already complete" in again.stdout


def test_sigkill_mid_run_resumes_byte_identical(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from data_pipelines.demo_corpus import write_corpus
    from tests.conftest_data import REPO

    files = write_corpus(tmp_path / "corpus", num_documents=12_000, seed=5, num_files=2)
    save_tokenizer(train_bpe(files[:1], vocab_size=300), tmp_path / "tok")
    args = [
        "-m",
        "data_pipelines.tokenize",
        "--input",
        str(tmp_path / "corpus"),
        "--txt-doc",
        "line",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--shard-tokens",
        "15000",
        "--no-progress",
        "--num-workers",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, *args, "--out", str(tmp_path / "cut")], cwd=REPO, env=env
    )
    deadline = time.time() + 60
    while len(list((tmp_path / "cut").glob("shard_*.bin"))) < 5 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "manifest.json").exists(), (
        "run finished before the kill: make the corpus larger"
    )
    run_py([*args, "--out", str(tmp_path / "cut")])
    tokenize_to_shards(
        SourceSpec(inputs=[str(tmp_path / "corpus")], txt_doc="line"),
        str(tmp_path / "tok"),
        tmp_path / "full",
        shard_tokens=15000,
        num_workers=1,
        progress=False,
    )
    assert len(shard_bytes(tmp_path / "full")) > 10
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "full")
    assert not list((tmp_path / "cut").glob("*.tmp-*"))


def test_jsonl_parquet_and_saved_dataset_give_the_same_shards(demo_data, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"doc {i} : tom has {i} apples ." for i in range(300)]
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    tok = str(demo_data / "tokenizer.json")
    outs = []
    for name, spec in [
        ("j", SourceSpec(inputs=[str(tmp_path / "d.jsonl")], text_field="body")),
        ("p", SourceSpec(inputs=[str(tmp_path / "d.parquet")], text_field="body")),
        ("s", SourceSpec(dataset=str(tmp_path / "saved"), text_field="body")),
    ]:
        m = tokenize_to_shards(
            spec, tok, tmp_path / name, shard_tokens=1000, num_workers=1, progress=False
        )
        assert m["num_documents"] == 300
        outs.append(shard_bytes(tmp_path / name))
    assert outs[0] == outs[1] == outs[2]
    t = Tokenizer.from_file(tok)
    _, stream = read_stream(tmp_path / "j")
    assert np.array_equal(stream, np.concatenate([t.encode(x).ids + [1] for x in texts]))


def test_hf_folder_layout_with_large_vocab_uses_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(
        ["<s>", "</s>"]
    )  # ids 70001, 70002; names only the folder's config knows
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    (tmp_path / "a.txt").write_text("w5 w69999 w123\n\nw7")
    spec = SourceSpec(inputs=[str(tmp_path / "a.txt")], txt_doc="paragraph")
    m = tokenize_to_shards(
        spec,
        str(folder),
        tmp_path / "out",
        shard_tokens=4,
        num_workers=1,
        add_bos=True,
        progress=False,
    )
    assert (
        m["dtype"] == "uint32"
        and m["vocab_size"] == 70_003
        and m["eos_id"] == 70_002
        and m["bos_id"] == 70_001
    )
    _, stream = read_stream(tmp_path / "out")
    assert stream.tolist() == [70_001, 5, 69_999, 123, 70_002, 70_001, 7, 70_002]
    assert [s["num_tokens"] for s in m["shards"]] == [4, 4]


def test_malformed_jsonl_line_names_file_and_line(demo_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    res = run_py(
        [
            "-m",
            "data_pipelines.tokenize",
            "--input",
            str(bad),
            "--tokenizer",
            str(demo_data / "tokenizer.json"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        check=False,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: malformed JSON in")
        and f"{bad} line 3" in lines[0]
    )
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(LladaError, match=r"nofield.jsonl line 1.*--text-field"):
        tokenize_to_shards(
            SourceSpec(inputs=[str(tmp_path / "nofield.jsonl")]),
            str(demo_data / "tokenizer.json"),
            tmp_path / "o2",
            num_workers=1,
            progress=False,
        )


def test_resume_with_other_settings_is_refused(demo_data, tmp_path):
    spec = SourceSpec(inputs=[str(demo_data / "corpus" / "part-00.txt")], txt_doc="line")
    tok = str(demo_data / "tokenizer.json")
    tokenize_to_shards(spec, tok, tmp_path / "o", shard_tokens=5000, num_workers=1, progress=False)
    with pytest.raises(LladaError, match=r"differs in: shard_tokens"):
        tokenize_to_shards(
            spec, tok, tmp_path / "o", shard_tokens=6000, num_workers=1, progress=False
        )
    m = tokenize_to_shards(
        spec, tok, tmp_path / "o", shard_tokens=6000, num_workers=1, progress=False, overwrite=True
    )
    assert m["shard_tokens"] == 6000 and len(list((tmp_path / "o").glob("shard_*.bin"))) == len(
        m["shards"]
    )


def test_tinyshakespeare_paragraphs_round_trip(tmp_path):
    path = shared_file("tinyshakespeare/input.txt")
    text = path.read_text()
    save_tokenizer(train_bpe([path], vocab_size=1000), tmp_path / "tok")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    spec = SourceSpec(inputs=[str(path)], txt_doc="paragraph")
    m = tokenize_to_shards(
        spec,
        str(tmp_path / "tok"),
        tmp_path / "out",
        shard_tokens=100_000,
        num_workers=2,
        progress=False,
    )
    paragraphs = [
        p for p in re.split(r"\n(?:[ \t]*\n)+", text.strip("\n")) if p.strip()
    ]  # independent splitter
    assert m["num_documents"] == len(paragraphs) == 7222
    _, stream = read_stream(tmp_path / "out")
    assert m["num_tokens"] == len(stream) == sum(len(tok.encode(p).ids) + 1 for p in paragraphs)
    ends = np.flatnonzero(stream == 1)
    assert len(ends) == len(paragraphs) and ends[-1] == len(stream) - 1
    decoded = [tok.decode(d.tolist()) for d in np.split(stream, ends + 1)[:-1]]
    assert decoded == [p.rstrip("\n") for p in paragraphs]


def test_empty_input_is_refused_and_nothing_is_written(demo_data, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n')
    for name in ("empty.txt", "blank.jsonl"):
        out = tmp_path / f"out_{name}"
        res = cli(
            "llada-tokenize",
            ["--input", str(tmp_path / name), "--tokenizer", str(demo_data / "tokenizer.json"),
             "--out", str(out), "--no-progress"],
            check=False,
        )
        assert res.returncode == 2 and not out.exists()
        assert res.stderr.strip().splitlines() == [
            f"error: no documents in {tmp_path / name} (empty or blank text only): nothing "
            "written; check --input/--dataset and --text-field"
        ]


def test_train_tokenizer_console_script_then_tokenize(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"To be, or not to be, that is question {i}." for i in range(200)))
    res = cli("llada-train-tokenizer", ["--out", str(tmp_path / "tok"), "--vocab-size", "300", str(corpus)])
    assert f"wrote {tmp_path / 'tok' / 'tokenizer.json'}" in res.stdout and "next: llada-tokenize" in res.stdout
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(6))
    assert tok.decode(tok.encode("to be, or not").ids) == "to be, or not"
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["mask_token"] == "<|mdm_mask|>" and "chat_template" in config
    m = tokenize_to_shards(
        SourceSpec(inputs=[str(corpus)], txt_doc="paragraph"), str(tmp_path / "tok"),
        tmp_path / "shards", num_workers=1, progress=False,
    )
    assert m["num_documents"] == 200
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = cli("llada-train-tokenizer", ["--out", str(tmp_path / "t2"), str(empty)], check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: tokenizer training files are empty: {empty}: pass files with text"
    ]
    assert not (tmp_path / "t2").exists()


def test_export_of_a_bare_tokenizer_json_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from llada_train.model.checkpoint import save_pretrained
    from llada_train.model.config import ModelConfig

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello there, general kenobi\n" * 50)
    bare = tmp_path / "bare"
    bare.mkdir()
    train_bpe([corpus], vocab_size=300).save(str(bare / "tokenizer.json"))  # no HF config beside it
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=32, vocab_size=300)
    state = {"w": torch.zeros(2)}
    out = save_pretrained(state, cfg, tmp_path / "export", tokenizer_dir=bare / "tokenizer.json")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == cfg.max_sequence_length
    hf = AutoTokenizer.from_pretrained(str(out))
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.mask_token) == (
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|mdm_mask|>"
    )
    assert hf.mask_token_id == cfg.mask_token_id and hf.eos_token_id == cfg.eos_token_id
    text = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
