"""llada-sft-data records (chat template, multi-turn split, length policy) and the SFT reader."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from data_pipelines.sft_records import (
    RecordSpec,
    build_arg_parser,
    build_records,
    specs_from_args,
)
from data_pipelines.sources import SourceSpec
from data_pipelines.train_tokenizer import save_tokenizer, train_bpe
from llada_train.chat import ChatTemplate
from llada_train.data import SFTDataConfig, build_sft_reader, collate_sft
from llada_train.errors import LladaError
from tests.conftest_data import run_py, shared_file

HDR = "<|start_header_id|>{}<|end_header_id|>\n\n"


def render_prompt(history: list[dict]) -> str:
    """SPEC §1 template as a string (the independent reference)."""
    body = "".join(HDR.format(m["role"]) + m["content"] + "<|eot_id|>" for m in history)
    return "<|startoftext|>" + body + HDR.format("assistant")


def records(folder) -> tuple[dict, list[np.ndarray], np.ndarray]:
    m = json.loads((folder / "manifest.json").read_text())
    tokens = np.fromfile(folder / "tokens.bin", dtype=m["dtype"])
    offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
    plen = np.fromfile(folder / "prompt_len.bin", dtype=np.int64)
    return m, [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)], plen


def build(*args: str) -> dict:
    return build_records(*specs_from_args(build_arg_parser().parse_args(list(args))))


DIALOGUE = [
    {"role": "user", "content": "what is 3 plus 4 ?"},
    {"role": "assistant", "content": "3 plus 4 is 7 ."},
    {"role": "user", "content": "and what is 7 minus 2 ?"},
    {"role": "assistant", "content": "7 minus 2 is 5 ."},
    {"role": "user", "content": "and what is 5 plus 1 ?"},
    {"role": "assistant", "content": "5 plus 1 is 6 ."},
]


def test_three_turn_dialogue_gives_three_records_with_history(demo_data, tmp_path):
    tok_path = str(demo_data / "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": DIALOGUE}) + "\n")
    m = build(
        "--input", str(tmp_path / "c.jsonl"), "--tokenizer", tok_path, "--out", str(tmp_path / "r")
    )
    assert m["num_records"] == 3 and m["stats"]["dialogues"] == 1
    _, recs, plen = records(tmp_path / "r")
    for k in range(3):
        prompt = tok.encode(render_prompt(DIALOGUE[: 2 * k + 1]), add_special_tokens=False).ids
        response = tok.encode(
            DIALOGUE[2 * k + 1]["content"] + "<|eot_id|>", add_special_tokens=False
        ).ids
        assert plen[k] == len(prompt) and recs[k].tolist() == prompt + response
        text = tok.decode(recs[k][: plen[k]].tolist(), skip_special_tokens=False)
        assert all(msg["content"] in text for msg in DIALOGUE[: 2 * k + 1])  # all earlier turns
        assert DIALOGUE[2 * k + 1]["content"] not in text
    assert recs[0][0] == 0 and (recs[2] == 0).sum() == 1  # BOS once


def test_inference_prompt_is_the_sft_record_prompt(demo_data, tmp_path):
    # one chat template: what llada-generate/llada-eval feed the model for a user prompt
    # (chat=true) is exactly the prompt part the SFT record was trained on
    from llada_train.eval.text import TextCodec

    tok_path = str(demo_data / "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    rows = [{"prompt": "what is 3 plus 4 ?", "response": "7 ."},
            {"prompt": "and what is 12 minus 5 ?", "response": "7 ."}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for system in (None, "answer with one number ."):
        out = tmp_path / f"r{system is None}"
        m = build_records(SourceSpec(inputs=[str(tmp_path / "p.jsonl")]), tok_path, out,
                          RecordSpec(system=system))
        assert m["num_records"] == 2 and m["template"] == vars(ChatTemplate())
        _, recs, plen = records(out)
        codec = TextCodec(tok_path, bos_token_id=0, chat=ChatTemplate(), system=system)
        for row, rec, p in zip(rows, recs, plen, strict=True):
            assert codec.encode_prompt(row["prompt"]) == rec[:p].tolist()
            # and both are the SPEC §1 string encoded in one piece (the independent reference)
            history = [{"role": "system", "content": system}] if system else []
            history.append({"role": "user", "content": row["prompt"]})
            reference = tok.encode(render_prompt(history), add_special_tokens=False).ids
            assert rec[:p].tolist() == reference


def test_typed_spec_is_checked(demo_data, tmp_path):
    src = SourceSpec(inputs=[str(tmp_path / "none.jsonl")])
    with pytest.raises(LladaError, match="turns='some'"):
        build_records(src, str(demo_data), tmp_path / "o", RecordSpec(turns="some"))
    with pytest.raises(LladaError, match="no input"):
        build_records(SourceSpec(), str(demo_data), tmp_path / "o")
    with pytest.raises(LladaError, match="is not in the tokenizer"):
        build_records(src, str(demo_data), tmp_path / "o",
                      RecordSpec(template=ChatTemplate(eot="<|im_end|>")))


def test_random_turn_mode_is_seeded_per_dialogue(demo_data, tmp_path):
    with open(tmp_path / "c.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"messages": DIALOGUE}) + "\n")
    common = [
        "--input",
        str(tmp_path / "c.jsonl"),
        "--tokenizer",
        str(demo_data / "tokenizer.json"),
        "--turns",
        "random",
    ]
    picks = {}
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        m = build(*common, "--seed", seed, "--out", str(tmp_path / name))
        assert m["num_records"] == 40
        picks[name] = records(tmp_path / name)[2].tolist()  # prompt length identifies the turn
    assert picks["a"] == picks["b"] and picks["a"] != picks["c"]
    assert len(set(picks["a"])) == 3  # all three turns get picked somewhere


def test_pair_fields_and_length_policy(demo_data, tmp_path):
    tok_path = str(demo_data / "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    rows = [{"question": "q " * n, "answer": "a " * (2 * n)} for n in range(1, 30)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lens = [
        (
            len(tok.encode(render_prompt([{"role": "user", "content": r["question"]}])).ids),
            len(tok.encode(r["answer"] + "<|eot_id|>").ids),
        )
        for r in rows
    ]
    common = [
        "--input",
        str(tmp_path / "p.jsonl"),
        "--tokenizer",
        tok_path,
        "--prompt-field",
        "question",
        "--response-field",
        "answer",
        "--max-length",
        "40",
    ]
    drop = build(*common, "--out", str(tmp_path / "d"))
    assert drop["stats"]["dropped_too_long"] == sum(p + r > 40 for p, r in lens)
    assert drop["num_records"] == sum(p + r <= 40 for p, r in lens)
    trunc = build(*common, "--overflow", "truncate", "--out", str(tmp_path / "t"))
    assert trunc["stats"]["truncated"] == sum(p < 40 < p + r for p, r in lens)
    assert trunc["stats"]["dropped_too_long"] == sum(p >= 40 for p, r in lens)
    _, recs, plen = records(tmp_path / "t")
    assert max(len(x) for x in recs) == 40 and all(
        len(x) > p for x, p in zip(recs, plen, strict=True)
    )


def test_malformed_and_wrong_rows_name_file_and_line(demo_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": DIALOGUE}) + "\n\n" + '{"messages": [}\n')
    res = run_py(
        [
            "-m",
            "data_pipelines.sft_records",
            "--input",
            str(bad),
            "--tokenizer",
            str(demo_data),
            "--out",
            str(tmp_path / "o"),
        ],
        check=False,
    )
    assert res.returncode == 2 and f"error: malformed JSON in {bad} line 3" in res.stderr
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(LladaError, match=rf"message 0 in {bad} line 1 has role 'robot'"):
        build("--input", str(bad), "--tokenizer", str(demo_data), "--out", str(tmp_path / "o"))
    bad.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(
        LladaError, match=rf"{bad} line 1 has neither 'messages' nor 'prompt'\+'response'"
    ):
        build("--input", str(bad), "--tokenizer", str(demo_data), "--out", str(tmp_path / "o"))


def test_collator_pads_with_eos():
    seqs = [np.array([7, 8, 9]), np.array([5]), np.array([4, 4, 4, 4, 4])]
    b = collate_sft(seqs, [2, 1, 3], eos_id=1)
    assert b["input_ids"].tolist() == [[7, 8, 9, 1, 1], [5, 1, 1, 1, 1], [4, 4, 4, 4, 4]]
    assert b["prompt_len"].tolist() == [2, 1, 3] and b["input_ids"].dtype == torch.long
    assert collate_sft(seqs, [2, 1, 3], eos_id=1, multiple_of=4)["input_ids"].shape == (3, 8)
    assert collate_sft(seqs, [2, 1, 3], eos_id=9, length=6)["input_ids"][1].tolist() == [
        5,
        9,
        9,
        9,
        9,
        9,
    ]
    with pytest.raises(LladaError, match=r"more than data.pad_to_length=4"):
        collate_sft(seqs, [2, 1, 3], eos_id=1, length=4)


def test_sft_reader_epoch_ranks_and_resume(demo_data):
    cfg = SFTDataConfig(path=str(demo_data / "sft"), tokenizer=str(demo_data / "tokenizer.json"))
    _, recs, plen = records(demo_data / "sft")
    n = len(recs)
    everything = Counter((tuple(r.tolist()), int(p)) for r, p in zip(recs, plen, strict=True))
    built = [
        build_sft_reader(cfg, 8, seed=3, rank=r, world_size=2, eos_token_id=1) for r in range(2)
    ]
    readers = [reader for reader, _ in built]
    assert built[0][1].num_records == n
    seen = []
    steps = -(-n // 16)
    for _ in range(steps):
        for rd in readers:
            b = next(rd)
            for row, p in zip(b["input_ids"], b["prompt_len"], strict=True):
                ids = row.tolist()
                k = len(ids)
                while ids[k - 1] == 1:  # strip EOS padding: every record ends with <|eot_id|> (5)
                    k -= 1
                seen.append((tuple(ids[:k]), int(p)))
    assert Counter(seen[:n]) == everything and readers[0].epoch == 1  # each record once per epoch
    state = readers[1].state_dict()
    expect = [next(readers[1]) for _ in range(3)]
    fresh, _ = build_sft_reader(cfg, 8, seed=3, rank=1, world_size=2, eos_token_id=1)
    fresh.load_state_dict(state)
    for e in expect:
        got = next(fresh)
        assert torch.equal(got["input_ids"], e["input_ids"]) and torch.equal(
            got["prompt_len"], e["prompt_len"]
        )
    with pytest.raises(
        LladaError, match=r"EOS mismatch in SFT records .*records use EOS id 1, the model 2"
    ):
        build_sft_reader(cfg, 8, seed=3, rank=0, world_size=1, eos_token_id=2)


def test_gsm8k_question_answer_records_round_trip(tmp_path):
    path = shared_file("gsm8k/train.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    corpus = tmp_path / "qa.txt"
    corpus.write_text("\n".join(r["question"] + "\n" + r["answer"] for r in rows[:1000]))
    save_tokenizer(train_bpe([corpus], vocab_size=1000), tmp_path / "tok")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    m = build(
        "--input",
        str(path),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--prompt-field",
        "question",
        "--response-field",
        "answer",
        "--out",
        str(tmp_path / "r"),
    )
    assert len(rows) == 7473 and m["stats"]["dialogues"] == 7473 and m["num_records"] == 7473
    _, recs, plen = records(tmp_path / "r")
    for i in (0, 1, 3000, 7472):
        prompt = tok.decode(recs[i][: plen[i]].tolist(), skip_special_tokens=False)
        answer = tok.decode(recs[i][plen[i] :].tolist(), skip_special_tokens=False)
        assert prompt == render_prompt([{"role": "user", "content": rows[i]["question"]}])
        assert answer == rows[i]["answer"] + "<|eot_id|>"
