"""``llada-generate`` prompts that hold newlines: a JSONL ``prompt_file`` and opt-in escapes."""

from __future__ import annotations

import json

import pytest

from llada_train.cli.generate import read_prompts, unescape
from llada_train.errors import LladaError
from llada_train.eval.config import GenerateConfig
from tests.test_eval_cli import model_dir, run_cli  # noqa: F401  (model_dir is a fixture)


def test_jsonl_prompt_file_keeps_newlines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "line one\nline two"}) + "\n\n"
                 + json.dumps({"prompt": "x", "id": 3}) + "\n")
    assert read_prompts(GenerateConfig(prompts=["a"], prompt_file=str(f))) == [
        "a", "line one\nline two", "x"
    ]


def test_plain_prompt_file_is_one_prompt_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('{"prompt": "kept as text"}\n\nsecond\n')
    assert read_prompts(GenerateConfig(prompt_file=str(f))) == ['{"prompt": "kept as text"}',
                                                                "second"]


def test_jsonl_lines_without_a_prompt_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no"}) + "\n")
    with pytest.raises(LladaError) as err:
        read_prompts(GenerateConfig(prompt_file=str(f)))
    assert str(err.value) == (
        f'{f} line 2 has no "prompt" string: write one {{"prompt": "..."}} object per line'
    )
    f.write_text('{"prompt": "ok"\n')
    with pytest.raises(LladaError, match=r"malformed JSON in .*p.jsonl line 1"):
        read_prompts(GenerateConfig(prompt_file=str(f)))


def test_escapes_only_when_asked():
    raw = r"a\nb\tc\\nd \x"  # \\n is a backslash then n; \x is not an escape and stays
    assert read_prompts(GenerateConfig(prompts=[raw])) == [raw]
    assert read_prompts(GenerateConfig(prompts=[raw], prompt_escapes=True)) == [
        "a\nb\tc\\nd \\x"
    ]
    assert unescape(r"\\\\") == "\\\\"


def test_generate_cli_reads_a_multiline_jsonl_prompt(model_dir, tmp_path):  # noqa: F811
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "what is\n3 plus 4"}) + "\n")
    res = run_cli(
        "llada_train.cli.generate", f"model_path={model_dir}", f"prompt_file={f}",
        r"prompts=[what is\n2]", "prompt_escapes=true", "decode.gen_length=4", "decode.block_length=4",
        f"hydra.run.dir={tmp_path}",
    )
    assert res.returncode == 0, res.stderr
    assert "### prompt: what is\n2\n" in res.stdout
    assert "### prompt: what is\n3 plus 4\n" in res.stdout
    assert "2 prompt(s)" in res.stdout
