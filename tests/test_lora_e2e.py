"""LoRA through the real entry points: ``llada-sft peft=lora`` on the demo chat set.

The loss falls, checkpoints hold the adapters only (a small fraction of a full run's),
resume from a mid-run checkpoint is exact, ``llada-export`` writes the adapter or the merged
model, ZeRO-2 and ZeRO-3 agree (chunked loss included), and bad input is one line with nothing written.
The one-rank launches share one import (``tests/forked_launches.py``),
each still its own process from ``main()`` on.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from llada_train.cli import generate
from llada_train.cli.export import main as export_main
from llada_train.config import CONF_DIR
from llada_train.model import LLaDAModel, save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.train.safe_load import torch_load
from tests.conftest import REPO
from tests.forked_launches import PRELOAD, forked_launches, launched
from tests.launch_utils import metrics, one_error_line, run, torchrun_cmd

pytestmark = pytest.mark.slow
pytest.importorskip("peft")

LORA = ["peft=lora", "peft.r=16", "peft.alpha=32",
        "peft.target_modules=[q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out]"]
STEPS = 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A seeded ``tiny`` model in the released layout (a frozen base needs no pre-training
    for LoRA to fit the chat set's token statistics)."""
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/tiny.yaml"))
    cfg = OmegaConf.to_object(cfg)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return save_pretrained(dict(model.named_parameters()), cfg, tmp_path_factory.mktemp("base") / "base")


def sft(run_dir, base, demo_data, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}", f"init_from={base}", f"data.path={demo_data / 'sft'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}", "trainer.global_batch_size=16",
        "trainer.micro_batch_size=16", "trainer.seq_len=128", "trainer.epochs=0", "schedule=sft_demo",
        "schedule.peak_lr=5e-3", "schedule.warmup_steps=3", "logging.log_every=1",
        "logging.progress_bar=false", *extra,
    ]


@pytest.fixture(scope="module")
def one_rank(base, demo_data, tmp_path_factory):
    """Every one-rank ``llada-sft`` launch of this module, each from ``main()`` on in its own
    process, all after one import (``forked_launches``): (run dirs, results) by name. In order:
    the LoRA run, a full run of one step (its checkpoint's size), bad LoRA input, the LoRA run
    resumed from a ``branch_at`` copy of its mid-run checkpoint, and that folder run again
    without LoRA."""
    tmp = tmp_path_factory.mktemp("lora")
    runs = {name: tmp / name for name in ("run", "full", "bad", "resumed")}
    cases = {
        "run": {"argv": sft(runs["run"], base, demo_data, *LORA, f"trainer.max_steps={STEPS}",
                            f"trainer.save_every={STEPS // 2}", "trainer.keep_last=3")},
        "full": {"argv": sft(runs["full"], base, demo_data, "trainer.max_steps=1",
                             "trainer.export_at_end=false")},
        "bad": {"argv": sft(runs["bad"], base, demo_data, "peft=lora", "peft.target_modules=[q_proj,qkv]")},
        "resumed": {"argv": sft(runs["resumed"], base, demo_data, *LORA, f"trainer.max_steps={STEPS}"),
                    "branch": [str(runs["run"]), STEPS // 2, str(runs["resumed"])]},
        "no_lora": {"argv": sft(runs["resumed"], base, demo_data, f"trainer.max_steps={STEPS + 1}")},
    }  # fmt: skip
    results = forked_launches("llada_train.cli.sft", list(cases.values()), tmp / "logs",
                              preload=(*PRELOAD, "peft"))  # fmt: skip
    return runs, {name: launched(r) for name, r in zip(cases, results, strict=True)}


@pytest.fixture(scope="module")
def lora_run(one_rank):
    proc = one_rank[1]["run"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    return one_rank[0]["run"]


GENERATE = ['prompts=["what does a cow say ?"]', "chat=true", "decode.gen_length=8",
            "decode.block_length=8", "progress=false"]


def generated(model_path, capsys) -> str:
    """What ``llada-generate model_path=... GENERATE`` prints, run in this process: the
    console script composes conf/generate.yaml with its overrides the same way, then calls
    ``run_config`` (an error exits, failing the test with its line)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="generate", overrides=[f"model_path={model_path}", *GENERATE])
    capsys.readouterr()
    generate.run_config(cfg)
    return capsys.readouterr().out


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_lora_sft_loss_falls_and_checkpoints_hold_only_adapters(lora_run, one_rank, base):
    losses = [m["loss"] for m in metrics(lora_run)]
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    print(f"LoRA SFT loss: first 3 steps {start:.3f}, last 5 steps {end:.3f}")
    assert len(losses) == STEPS and end < 0.9 * start
    step = lora_run / "checkpoints" / f"step_{STEPS:08d}"
    module = torch_load(step / "mp_rank_00_model_states.pt")["module"]
    assert module and all(".lora_A.default." in k or ".lora_B.default." in k for k in module)
    runs, results = one_rank
    assert results["full"].returncode == 0, results["full"].stdout[-3000:]
    full = runs["full"] / "checkpoints" / "step_00000001"
    trainable = sum(v.numel() for v in module.values())
    total = sum(v.numel() for v in load_file(base / "model.safetensors").values())
    ratio = _size(step) / _size(full)
    print(f"LoRA r=16 on tiny: trainable fraction {trainable / (total + trainable):.4f} "
          f"({trainable} of {total + trainable}); checkpoint {_size(step)} B vs full {_size(full)} B "
          f"= ratio {ratio:.3f}")
    # weights + two Adam moments of the adapters only: the ratio tracks the trainable share
    assert ratio < 1.5 * trainable / total + 0.02


def test_end_of_run_export_and_llada_export_agree(lora_run, tmp_path, capsys):
    adapter, merged = lora_run / "adapter", lora_run / "export"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        f.name for f in adapter.iterdir()}
    end = load_file(merged / "model.safetensors")
    assert not any("lora" in k for k in end)
    # llada-export's console script is this main: in-process, without a fresh interpreter's
    # seconds of imports (an error exits, failing the test with its line)
    export_main(["--run-dir", str(lora_run), "--merge-lora", "--out", str(tmp_path / "m")])
    export_main(["--run-dir", str(lora_run), "--out", str(tmp_path / "a")])
    export_main(["--adapter", str(adapter), "--merge-lora", "--out", str(tmp_path / "m2")])
    for out in ("m", "m2"):
        again = load_file(tmp_path / out / "model.safetensors")
        assert set(again) == set(end) and all(torch.equal(again[k], end[k]) for k in end)
    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # llada-generate takes the adapter folder (it names its base) like a model folder
    via_adapter = generated(adapter, capsys)
    assert "### prompt: what does a cow say ?" in via_adapter
    assert via_adapter == generated(merged, capsys)


def test_resume_from_a_mid_run_checkpoint_is_exact(lora_run, one_rank):
    half = f"step_{STEPS // 2:08d}"
    run_dir, proc = one_rank[0]["resumed"], one_rank[1]["resumed"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / half}" in proc.stdout
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(lora_run)][STEPS // 2:]
    a = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same run_dir without LoRA (or other adapters) is refused, not silently mis-loaded
    assert "written with peft=lora r=16" in one_error_line(one_rank[1]["no_lora"])


def test_zero2_and_zero3_train_the_same_adapters(base, demo_data, tmp_path):
    # several recomputed loss chunks: under ZeRO-3 they run the frozen, partitioned head
    common = [*LORA, "trainer.max_steps=2", "trainer.micro_batch_size=8", "objective.loss_chunk_rows=64"]
    for stage in (2, 3):
        run(torchrun_cmd("llada_train.cli.sft", sft(
            tmp_path / f"z{stage}", base, demo_data, *common, f"deepspeed=zero{stage}")))
    z2 = load_file(tmp_path / "z2" / "adapter" / "adapter_model.safetensors")
    z3 = load_file(tmp_path / "z3" / "adapter" / "adapter_model.safetensors")
    assert set(z2) == set(z3) and max((z2[k] - z3[k]).abs().max().item() for k in z2) < 1e-5
    assert [m["loss"] for m in metrics(tmp_path / "z2")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "z3")], abs=1e-5)


def test_bad_lora_input_is_one_line_and_writes_nothing(one_rank):
    run_dir, proc = one_rank[0]["bad"], one_rank[1]["bad"]
    assert "'qkv' matches no Linear module" in one_error_line(proc)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "export").exists()
