"""``llada-generate`` / ``llada-eval`` end to end on a tiny random model with its own tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llada_train.chat import ChatTemplate
from llada_train.errors import LladaError
from llada_train.eval import TextCodec, decode_batch, evaluate_generation, get_extractor
from llada_train.eval.decode import LowConfidenceConfig
from llada_train.model import LLaDAModel, ModelConfig, save_pretrained
from llada_train.sample import left_pad

REPO = Path(__file__).resolve().parents[1]
WORDS = ["<bos>", "<eos>", "<mask>", "what", "is", "plus", "####", "the", "answer"] + [str(d) for d in range(10)]


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<bos>", "<eos>", "<mask>"])
    tok.save(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=64, vocab_size=len(WORDS),
        mask_token_id=2, eos_token_id=1, pad_token_id=1, bos_token_id=0, init_std=1.0,
    )
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("tiny") / "export"
    tmp_tok = folder.parent / "tokenizer.json"
    make_tokenizer(tmp_tok)
    save_pretrained(model.state_dict(), cfg, folder, tokenizer_dir=tmp_tok)
    return folder


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


def test_generate_cli(model_dir, tmp_path):
    res = run_cli(
        "llada_train.cli.generate", f"model_path={model_dir}", "prompts=[what is 3 plus 4,what is 2]",
        "decode=med", "decode.gen_length=8", "decode.block_length=4",
        "decode.entropy_threshold=0.5",
        f"hydra.run.dir={tmp_path}",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("### prompt:") == 2
    assert "method=med" in res.stdout


def test_cli_config_errors(capsys):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from llada_train.cli import generate as generate_cli
    from llada_train.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        with pytest.raises(ConfigCompositionException, match="gen_lenght"):
            compose(config_name="generate", overrides=["decode.gen_lenght=8"])  # strict schema
        cfg = compose(config_name="generate", overrides=["prompts=[what]"])
        mixed = compose(
            config_name="generate",
            overrides=["prompts=[what]", "model_path=m", "decode=med", "decode.method=random"],
        )
    with pytest.raises(SystemExit) as exc:
        generate_cli.run_config(cfg)  # model_path left at ???
    assert exc.value.code == 2
    assert "model_path is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        generate_cli.run_config(mixed)  # med's settings cannot run as random
    assert exc.value.code == 2
    assert "choose the method with decode=random" in capsys.readouterr().err


def test_eval_cli_matches_library(model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"what is {a} plus {b}", "answer": f"the answer #### {(a + b) % 10}"}
            for a, b in [(1, 2), (3, 4), (5, 1)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pred.jsonl"
    res = run_cli(
        "llada_train.cli.eval", f"model_path={model_dir}", f"data_path={data}", f"output={out}",
        "decode.gen_length=8", "decode.steps=8", "decode.block_length=4", "batch_size=2", "progress=false",
        f"hydra.run.dir={tmp_path}",
    )
    assert res.returncode == 0, res.stderr
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert [it["gold"] for it in items] == ["3", "7", "6"]
    assert all(it["nfe"] == 8 for it in items)
    correct = sum(it["correct"] for it in items)
    assert f"accuracy={correct / 3:.4f} ({correct}/3)" in res.stdout
    # the CLI's completions are the library's
    from llada_train.model import load_pretrained

    model = load_pretrained(model_dir).eval()
    codec = TextCodec(model_dir, bos_token_id=0, stop_ids=[1])
    cfg = LowConfidenceConfig(gen_length=8, steps=8, block_length=4)
    ids, attn = left_pad([codec.encode_prompt(r["question"]) for r in rows], 1)
    lib = decode_batch(model, ids, attn, cfg, mask_token_id=2, eos_token_id=1, eot_token_id=None,
                       decode=codec.decode, extract=get_extractor("gsm8k"))
    assert [it["completion"] for it in items] == lib.texts
    report = evaluate_generation(model, codec, rows, cfg, extract=get_extractor("gsm8k"), mask_token_id=2,
                                 eos_token_id=1, pad_token_id=1, batch_size=3, progress=False)
    assert report.total == 3 and report.correct == correct and report.mean_nfe == 8


def test_llada_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    words = specials + ["user", "assistant", "what", "is", "3", "system"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(tmp_path / "tokenizer.json"))
    codec = TextCodec(tmp_path, bos_token_id=0, stop_ids=[1, 4], chat=ChatTemplate())
    ids = codec.encode_prompt("what is 3")
    # BOS once, user header, text, EoT, assistant header (SPEC §1)
    assert ids == [0, 2, 5, 3, 7, 8, 9, 4, 2, 6, 3]
    assert codec.decode([7, 8, 4, 9]) == "what is"  # cut at EoT
    sys_codec = TextCodec(tmp_path, chat=ChatTemplate(), system="is")
    assert sys_codec.encode_prompt("3") == [0, 2, 10, 3, 8, 4, 2, 5, 3, 9, 4, 2, 6, 3]
    with pytest.raises(LladaError, match="not in the tokenizer"):
        TextCodec(tmp_path, chat=ChatTemplate(eot="<|im_end|>"))  # token strings are checked
    with pytest.raises(LladaError, match="chat=true"):
        TextCodec(tmp_path, system="be brief")
