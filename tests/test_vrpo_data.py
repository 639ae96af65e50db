"""Preference records (``llada-preference-data``) and their reader: layout, length checks,
one-line errors, identical answers warned and counted."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from data_pipelines.preference_records import PreferenceSpec, build_preference_records, main
from data_pipelines.sources import SourceSpec
from llada_train.chat import ChatEncoder
from llada_train.data.config import SFTDataConfig
from llada_train.data.preference import build_preference_reader, check_preference_data
from llada_train.data.tokenizer import load_tokenizer
from llada_train.errors import LladaError

ROWS = [
    {
        "prompt": "what does a pig say ?",
        "chosen": "a pig says oink .",
        "rejected": "a pig says moo .",
    },
    {
        "messages": [{"role": "user", "content": "what colour is the night ?"}],
        "chosen": "the night is black .",
        "rejected": "the night is green .",
    },
    {
        "chosen": [
            {"role": "user", "content": "what does a dog say ?"},
            {"role": "assistant", "content": "a dog says woof ."},
        ],
        "rejected": [
            {"role": "user", "content": "what does a dog say ?"},
            {"role": "assistant", "content": "a dog says oink ."},
        ],
    },
    {
        "prompt": "what does a cat say ?",
        "chosen": "a cat says meow .",
        "rejected": "a cat says meow .",
    },
]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_records_hold_templated_pairs_and_the_reader_stacks_chosen_then_rejected(
    demo_data, tmp_path, capsys
):
    tok = demo_data / "tokenizer.json"
    src = SourceSpec(inputs=[write_rows(tmp_path / "p.jsonl", ROWS)])
    m = build_preference_records(src, tok, tmp_path / "out")
    assert m["num_pairs"] == 3 and m["stats"]["dropped_identical"] == 1
    assert "1 pairs have chosen identical to rejected (first at" in capsys.readouterr().err
    chat = ChatEncoder(load_tokenizer(tok))
    prompt, chosen = chat.encode(
        [
            chat.prompt_segments([{"role": "user", "content": ROWS[2]["chosen"][0]["content"]}]),
            chat.response_segments("a dog says woof ."),
        ]
    )
    toks = np.fromfile(tmp_path / "out" / "tokens.bin", dtype=m["dtype"])
    off = np.fromfile(tmp_path / "out" / "offsets.bin", dtype=np.int64)
    assert toks[off[4] : off[5]].tolist() == prompt + chosen  # pair 2's chosen record
    assert np.fromfile(tmp_path / "out" / "prompt_len.bin", dtype=np.int64)[2] == len(prompt)
    cfg = SFTDataConfig(path=str(tmp_path / "out"), tokenizer=str(tok))
    reader, info = build_preference_reader(cfg, 2, seed=0, rank=0, world_size=1, eos_token_id=1)
    batch = next(reader)
    assert (
        info.num_records == 3
        and batch["input_ids"].shape[0] == 4
        and len(batch["sample_index"]) == 2
    )
    ids, plen = batch["input_ids"], batch["prompt_len"]
    for b in range(2):  # chosen row b and rejected row b + 2 share the prompt, differ after it
        p = int(plen[b])
        assert plen[b + 2] == p and ids[b, :p].tolist() == ids[b + 2, :p].tolist()
        assert ids[b, p:].tolist() != ids[b + 2, p:].tolist()
    check_preference_data(cfg, 512, 256)
    with pytest.raises(
        LladaError,
        match="max_sequence_length=8: rebuild them with llada-preference-data --max-length 8",
    ):
        check_preference_data(cfg, 512, 8)


def test_long_pairs_are_dropped_and_counted(demo_data, tmp_path):
    src = SourceSpec(inputs=[write_rows(tmp_path / "p.jsonl", ROWS[:3])])
    m = build_preference_records(
        src, demo_data / "tokenizer.json", tmp_path / "out", PreferenceSpec(max_length=32)
    )
    assert m["stats"]["dropped_too_long"] == 1 and m["max_record_length"] <= 32


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "hi", "chosen": "a"},
            r"p.jsonl line 2: the preference record has no 'rejected' answer",
        ),
        (
            {"prompt": "hi", "rejected": "a"},
            r"p.jsonl line 2: the preference record has no 'chosen' answer",
        ),
        ({"chosen": "a", "rejected": "b"}, r"p.jsonl line 2 has no prompt"),
    ],
)
def test_bad_rows_are_one_line_naming_the_row(demo_data, tmp_path, capsys, row, message):
    path = write_rows(tmp_path / "p.jsonl", [ROWS[0], row])
    with pytest.raises(SystemExit):
        main(
            [
                "--input",
                path,
                "--tokenizer",
                str(demo_data / "tokenizer.json"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


def test_sft_records_are_not_preference_records(demo_data):
    cfg = SFTDataConfig(path=str(demo_data / "sft"), tokenizer=None)
    with pytest.raises(LladaError, match="is not a preference records manifest"):
        check_preference_data(cfg, 512, 256)
