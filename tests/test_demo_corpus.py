"""Demo corpus, chat set, tokenizer and the prepared demo folder."""

from __future__ import annotations

import json
import re

import numpy as np
from tokenizers import Tokenizer

from data_pipelines.demo_corpus import generate_dialogues, generate_documents
from data_pipelines.train_tokenizer import SPECIAL_TOKENS, save_tokenizer, train_bpe


def test_corpus_is_deterministic_by_seed():
    assert generate_documents(50, seed=3) == generate_documents(50, seed=3)
    assert generate_documents(50, seed=3) != generate_documents(50, seed=4)
    assert generate_dialogues(20, seed=3) == generate_dialogues(20, seed=3)


def test_story_arithmetic_is_right():
    text = " ".join(generate_documents(2000, seed=0))
    adds = re.findall(
        r"(\w+) has (\d+) (\w+) \. \w+ gives \w+ (\d+) more \. now \1 has (\d+) \3 \.", text
    )
    subs = re.findall(
        r"(\w+) has (\d+) (\w+) \. \w+ (?:eats|loses) (\d+) of them \. now \1 has (\d+) \3 \.", text
    )
    facts = re.findall(r"(\d+) (plus|minus) (\d+) is (\d+) \.", text)
    assert len(adds) > 200 and len(subs) > 200 and len(facts) > 200
    assert all(int(x) + int(y) == int(z) for _, x, _, y, z in adds)
    assert all(int(x) - int(y) == int(z) >= 0 for _, x, _, y, z in subs)
    assert all(
        (int(x) + int(y) if op == "plus" else int(x) - int(y)) == int(z) for x, op, y, z in facts
    )


def test_dialogues_alternate_and_answer_correctly():
    dialogs = generate_dialogues(500, seed=1)
    turns = [len(d) // 2 for d in dialogs]
    assert set(turns) == {1, 2, 3}
    for d in dialogs:
        assert [m["role"] for m in d] == ["user", "assistant"] * (len(d) // 2)
        for q, a in zip(d[::2], d[1::2], strict=True):
            m = re.fullmatch(r"(?:and )?what is (\d+) (plus|minus) (\d+) \?", q["content"])
            if m:
                x, op, y = int(m[1]), m[2], int(m[3])
                assert a["content"] == f"{x} {op} {y} is {x + y if op == 'plus' else x - y} ."


def test_tokenizer_special_ids_and_round_trip(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(generate_documents(300)))
    tok_path = save_tokenizer(train_bpe([f], vocab_size=400), tmp_path / "tok")
    tok = Tokenizer.from_file(str(tok_path))
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert tok.get_vocab_size() == 400
    text = "tom has 3 apples . Ünïcode & 42 !"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: every string round-trips
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["bos_token"] == "<|startoftext|>"


def test_demo_folder_shards_decode_to_the_corpus(demo_data):
    tok = Tokenizer.from_file(str(demo_data / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    docs = [
        line
        for p in sorted((demo_data / "corpus").glob("*.txt"))
        for line in p.read_text().splitlines()
    ]
    assert len(docs) == 6000
    m = json.loads((demo_data / "shards" / "manifest.json").read_text())
    stream = np.concatenate(
        [np.fromfile(demo_data / "shards" / s["file"], dtype=np.uint16) for s in m["shards"]]
    )
    # independent reference: each document encoded alone, followed by EOS (id 1)
    ref = np.concatenate([np.asarray(tok.encode(d).ids + [1]) for d in docs])
    assert m["num_documents"] == 6000 and m["num_tokens"] == len(ref) == len(stream)
    assert np.array_equal(stream, ref)
    assert m["dtype"] == "uint16" and m["eos_id"] == 1 and m["vocab_size"] == 512
    sft = json.loads((demo_data / "sft" / "manifest.json").read_text())
    chat = [json.loads(x) for x in (demo_data / "chat.jsonl").read_text().splitlines()]
    assert sft["num_records"] == sum(
        len(c["messages"]) // 2 for c in chat
    )  # one record per assistant turn


def test_demo_report_buckets_fresh_dialogues_by_kind_and_avoids_the_sft_set():
    import json

    from llada_train.cli.demo_report import KINDS, dialogue_kind, held_out_dialogues

    assert dialogue_kind([{"content": "what is 3 plus 4 ?"}, {}]) == "arithmetic"
    assert dialogue_kind([{"content": "what does a duck say ?"}, {}]) == "animal sounds"
    assert dialogue_kind([{"content": "how many legs does a hen have ?"}, {}]) == "animal legs"
    assert dialogue_kind([{"content": "what colour is milk ?"}, {}]) == "colours"
    assert dialogue_kind([{"content": "tom has 1 balls and mia gives him 2 more . how many balls does tom have ?"}, {}]) == "stories"
    assert dialogue_kind([{}, {}, {"content": "and milk ?"}, {}]) == "multi-turn"
    seen = {json.dumps(d) for d in generate_dialogues(3000, seed=0)}
    buckets, trained = held_out_dialogues(5, seen)
    assert set(buckets) == set(KINDS) and all(len(b) == 5 for b in buckets.values())
    assert all(dialogue_kind(d) == k for k, b in buckets.items() for d in b)
    # the few animal and colour questions all occur in the SFT set; the rest are held out
    assert trained == {"animal sounds", "animal legs", "colours"}
    assert not any(json.dumps(d) in seen for k in KINDS if k not in trained for d in buckets[k])


def test_short_answers_ask_the_same_questions_and_answer_only_the_asked_part():
    import pytest

    from llada_train.errors import LladaError

    sentence = generate_dialogues(400, seed=2)
    short = generate_dialogues(400, seed=2, answers="short")
    assert len(short) == len(sentence)
    for d_long, d_short in zip(sentence, short, strict=True):
        assert [m["content"] for m in d_long[::2]] == [m["content"] for m in d_short[::2]]
        for long_a, short_a in zip(d_long[1::2], d_short[1::2], strict=True):
            words, sentence_words = short_a["content"].split(), long_a["content"].split()
            # "it says quack ." for "a duck says quack .": "it", a verb, the asked-for part
            assert words[0] == "it" and words[-1] == "." and len(words) <= len(sentence_words)
            assert set(words[2:]) <= set(sentence_words)
            m = re.fullmatch(r"\d+ (?:plus|minus) \d+ is (\d+) \.", long_a["content"])
            if m:
                assert short_a["content"] == f"it is {m[1]} ."
    with pytest.raises(LladaError, match="answer style"):
        generate_dialogues(3, answers="terse")


def test_demo_report_scores_short_answers_on_the_same_questions(tmp_path):
    from llada_train.cli.demo_report import answer_style, held_out_dialogues

    sentence, _ = held_out_dialogues(4, set())
    short, _ = held_out_dialogues(4, set(), answers="short")
    for kind, dialogues in sentence.items():
        assert [d[-2]["content"] for d in dialogues] == [d[-2]["content"] for d in short[kind]]
        assert all(d[-1]["content"].startswith("it ") for d in short[kind])
    # the report reads the style the data folder was built with
    chat = tmp_path / "chat.jsonl"
    assert answer_style(chat) == "sentence"  # no demo.json: the old folders' style
    (tmp_path / "demo.json").write_text(json.dumps({"settings": {"answers": "short"}}))
    assert answer_style(chat) == "short"
