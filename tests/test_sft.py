"""The SFT stage: init from a released-layout folder, SPEC §3 objective, EOS learned, GSM8K."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llada_train.chat import ChatEncoder
from llada_train.model import load_pretrained
from llada_train.sample import generate
from llada_train.tokenizer import load_tokenizer
from tests.forked_launches import forked_launches, launched
from tests.launch_utils import cli, metrics, one_error_line, run, torchrun_cmd

pytestmark = pytest.mark.slow

QUICK = ["logging.log_every=1", "logging.progress_bar=false", "trainer.epochs=0"]


def sft_args(run_dir, init_from, records, tokenizer, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"init_from={init_from}",
        f"data.path={records}",
        f"data.tokenizer={tokenizer}",
        "trainer.global_batch_size=16",
        "trainer.micro_batch_size=16",
        "trainer.seq_len=256",
        "schedule=sft_demo",
        *QUICK,
        *extra,
    ]


@pytest.fixture(scope="module")
def base_export(demo_data, tmp_path_factory):
    """``tiny`` pre-trained briefly on the demo corpus and exported."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    cli("llada-pretrain", [f"run_dir={run_dir}", f"data.path={demo_data / 'shards'}",
                           f"data.tokenizer={demo_data / 'tokenizer.json'}", "trainer.max_steps=40",
                           "trainer.seq_len=64", *QUICK[:2]])
    return run_dir / "export"


def stops_with_eos_fill(answer: list[int], eot: int, eos: int) -> bool:
    """A short answer, ``<|eot_id|>``, then nothing but end tokens (EOS fill; a repeated
    ``<|eot_id|>`` is parallel decoding's duplicate of the same prediction, not more text)."""
    if eot not in answer:
        return False
    stop = answer.index(eot)
    return 0 < stop < 20 and all(t in (eos, eot) for t in answer[stop + 1:])


@pytest.mark.isa
def test_sft_learns_to_answer_and_stop_with_eos_fill(base_export, demo_data, tmp_path):
    """40 prompts of every kind must stop. Measured with this training (300 steps at 2e-3):
    40/40 under the native AVX-512 kernels, ATEN_CPU_CAPABILITY=avx2 and =default; the bar is
    36. Cheaper runs sit on an edge: 200 steps at 3e-3 stopped 40/40 natively and under avx2
    but 21/40 under default; 400 steps at batch 8 stopped 30/40 natively."""
    from llada_train.cli.demo_report import held_out_dialogues

    run_dir = tmp_path / "sft"
    cli("llada-sft", sft_args(run_dir, base_export, demo_data / "sft", demo_data / "tokenizer.json",
                              "trainer.max_steps=300", "schedule.peak_lr=2e-3"), timeout=900)
    losses = [m["loss"] for m in metrics(run_dir)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model = load_pretrained(run_dir / "export")
    tok = load_tokenizer(run_dir / "export")
    eos, eot = model.config.eos_token_id, tok.token_to_id("<|eot_id|>")
    chat = ChatEncoder(tok)
    fixed = ["what is 2 plus 3 ?", "what does a cow say ?", "what colour is the grass ?", "what is 7 minus 4 ?"]
    by_kind, _ = held_out_dialogues(6, set())
    prompts = [[{"role": "user", "content": q}] for q in fixed]
    prompts += [d[:-1] for dialogues in by_kind.values() for d in dialogues]
    assert len(prompts) == 40
    ended = 0
    for messages in prompts:
        prompt = torch.tensor([chat.encode_prompt(messages)])
        out = generate(model, prompt, gen_length=32, steps=32, block_length=32, mask_token_id=model.config.mask_token_id)
        ended += stops_with_eos_fill(out.tokens[0, prompt.shape[1]:].tolist(), eot, eos)
    assert ended >= 36, f"only {ended}/40 answers stopped with EOS fill"


def test_the_stop_rule_by_hand():
    eot, eos = 5, 1
    assert stops_with_eos_fill([70, 276, 262, eot, eos, eos], eot, eos)
    assert stops_with_eos_fill([70, 276, 262, eot, eot, eos], eot, eos)  # a duplicated end token
    assert not stops_with_eos_fill([70, 276, 262, eot, 70, eos], eot, eos)  # text after the end
    assert not stops_with_eos_fill([eot, eos, eos], eot, eos)  # an empty answer
    assert not stops_with_eos_fill([70, 276, 262, eos, eos], eot, eos)  # no end of turn


def test_sft_under_zero3_loads_the_same_weights_as_zero0(base_export, demo_data, tmp_path):
    """Two ranks each, the first step's loss compared: one step is all either run needs."""
    first = {}
    for stage in (0, 3):
        run_dir = tmp_path / f"z{stage}"
        run(torchrun_cmd("llada_train.cli.sft", sft_args(
            run_dir, base_export, demo_data / "sft", demo_data / "tokenizer.json", "trainer.max_steps=1",
            "trainer.micro_batch_size=8", f"deepspeed=zero{stage}", "trainer.export_at_end=false")))
        first[stage] = metrics(run_dir)[0]["loss"]
    # step 1 sees identical weights, data and masks: the loaded model is the same
    assert first[3] == pytest.approx(first[0], abs=1e-6)


def test_init_from_a_folder_with_a_missing_shard_or_wrong_config(base_export, demo_data, tmp_path):
    """Both stop in ``preflight``, before any process group: each is ``llada-sft``'s ``main()``
    in a fork of one process that imported it once (``tests/forked_launches.py``)."""
    from llada_train.model import save_pretrained

    model = load_pretrained(base_export)
    sharded = save_pretrained(model.state_dict(), model.config, tmp_path / "sharded", max_shard_bytes=1_000_000)
    next(sharded.glob("model-00002-of-*.safetensors")).unlink()
    wrong = save_pretrained(model.state_dict(), model.config, tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["n_layers"] = 6
    (wrong / "config.json").write_text(json.dumps(cfg))
    cases = [{"argv": sft_args(tmp_path / run_dir, init_from, demo_data / "sft", demo_data / "tokenizer.json")}
             for run_dir, init_from in (("a", sharded), ("b", wrong))]  # fmt: skip
    missing, mismatch = forked_launches("llada_train.cli.sft", cases, tmp_path / "logs", preload=())
    assert "model-00002-of" in one_error_line(launched(missing))
    assert "match config.json" in one_error_line(launched(mismatch))


def test_pretrain_export_then_sft_on_gsm8k_loss_falls(shared_data, tmp_path):
    """Real text end to end: tokenizer and pre-training on Shakespeare, SFT on GSM8K."""
    py = [sys.executable, "-m"]
    tok_dir = tmp_path / "tok"
    run([*py, "data_pipelines.train_tokenizer", "--out", str(tok_dir), "--vocab-size", "1024",
         str(shared_data / "tinyshakespeare" / "input.txt"), str(shared_data / "gsm8k" / "train.jsonl")])
    run([*py, "data_pipelines.tokenize", "--input", str(shared_data / "tinyshakespeare" / "input.txt"),
         "--txt-doc", "paragraph", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "shards"), "--no-progress"])
    run([*py, "data_pipelines.sft_records", "--input", str(shared_data / "gsm8k" / "train.jsonl"),
         "--prompt-field", "question", "--response-field", "answer", "--tokenizer", str(tok_dir),
         "--out", str(tmp_path / "gsm8k"), "--max-length", "256", "--overflow", "drop"])
    model = ["model.vocab_size=1024", "model.max_sequence_length=256"]
    cli("llada-pretrain", [f"run_dir={tmp_path / 'pre'}", f"data.path={tmp_path / 'shards'}",
                           f"data.tokenizer={tok_dir}", "trainer.max_steps=20", "trainer.seq_len=128", *model, *QUICK[:2]])
    sft_dir = tmp_path / "sft"
    # 20 steps at 3e-3 (4 warm-up) end at 0.70 of the start (measured; 40 at 1e-3 ended at 0.65)
    cli("llada-sft", sft_args(sft_dir, tmp_path / "pre" / "export", tmp_path / "gsm8k", tok_dir,
                              "trainer.max_steps=20", "trainer.micro_batch_size=8", "schedule.warmup_steps=4",
                              "schedule.peak_lr=3e-3", "trainer.export_at_end=false"), timeout=600)
    losses = [m["loss"] for m in metrics(sft_dir)]
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"GSM8K SFT loss: start {start:.3f} end {end:.3f}")
    assert end < 0.85 * start
