"""objective=block through the entry points: start-up checks (one line each), the block-size
curriculum (logged, plotted, exact across a resume at a transition, exported as a block
model)."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from llada_train.cli.common import preflight
from llada_train.config import CONF_DIR, register_configs
from llada_train.errors import LladaError
from llada_train.train.schedule import ScheduleConfig, block_size_at, check_block_phases
from tests.launch_utils import branch_at, cli, metrics, run, torchrun_cmd

# 32-token windows, 4 per step: 128 tokens a step. Blocks 4, 8, the whole sequence, then 8,
# one step each, so a 4-step run crosses every transition.
PHASES = ("schedule.block_phases=[{start_tokens:0,block_size:4},{start_tokens:128,block_size:8},"
          "{start_tokens:256,block_size:0},{start_tokens:384,block_size:8}]")


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="pretrain", overrides=["data.tokenizer=null", *overrides])


@pytest.mark.parametrize("overrides,line", [
    (["objective=block", "objective.block_size=24", "trainer.seq_len=64"],
     "objective.block_size: block size 24 does not divide the sequence length 64; pick a block "
     "size that divides trainer.seq_len (e.g. a power of two)"),
    (["objective=block", "model.causal=true"],
     "objective=block needs a bidirectional model: set model.causal=false (a causal model cannot "
     "see the rest of its noisy block; an AR checkpoint converted with llada-convert trains as "
     "block diffusion with model.causal=false)"),
    (["objective=block", "trainer.seq_len=64",
      "schedule.block_phases=[{start_tokens:0,block_size:4},{start_tokens:1e6,block_size:48}]"],
     "schedule.block_phases[1]: block size 48 does not divide the sequence length 64; pick a "
     "block size that divides trainer.seq_len (e.g. a power of two)"),
    (["objective=block",
      "schedule.block_phases=[{start_tokens:0,block_size:4},{start_tokens:0,block_size:8}]"],
     "schedule.block_phases[1] starts at 0 tokens, not after phase 0 (0): phases must increase "
     "in tokens"),
    (["objective=block", "schedule.block_phases=[{start_tokens:5,block_size:4}]"],
     "schedule.block_phases[0] starts at 5 tokens; the first phase must start at 0"),
    (["schedule.block_phases=[{start_tokens:0,block_size:4}]"],
     "schedule.block_phases sets a block-size curriculum, but objective=pretrain trains no "
     "blocks: use objective=block, or schedule.block_phases=[]"),
    (["objective=block", "objective.t_per=token"],
     "objective.t_per='token'; use one of block, sequence"),
])
def test_bad_block_settings_are_one_line_at_start_up(overrides, line):
    with pytest.raises(LladaError) as err:
        preflight(composed(*overrides), world_size=1)
    assert str(err.value) == line


def test_preflight_records_the_block_size_the_run_ends_with():
    pre = preflight(composed("objective=block", "trainer.seq_len=64"), world_size=1)
    assert pre.model_cfg.block_size == 32  # conf/objective/block.yaml
    pre = preflight(composed("objective=block", "trainer.seq_len=64", PHASES), world_size=1)
    assert pre.model_cfg.block_size == 8  # the curriculum's last phase
    assert preflight(composed(), world_size=1).model_cfg.block_size == 0


def test_block_size_at_follows_the_phases_by_tokens():
    s = ScheduleConfig(block_phases=[])
    assert block_size_at(s, 1e9) is None
    cfg = composed("objective=block", "schedule=block_curriculum")
    from omegaconf import OmegaConf

    s = OmegaConf.to_object(cfg.schedule)
    check_block_phases(s.block_phases)
    sizes = [ph.block_size for ph in s.block_phases]
    assert sizes[:4] == [1, 4, 32, 64] and 0 in sizes and sizes[-1] == 32  # LLaDA 2.0 §4.1
    starts = [ph.start_tokens for ph in s.block_phases]
    assert block_size_at(s, 0) == 1 and block_size_at(s, starts[1] - 1) == 1
    assert block_size_at(s, starts[1]) == 4 and block_size_at(s, 1e30) == 32


def curriculum_args(demo_data) -> list[str]:
    """Blocks 4 -> 8 -> L -> 8 over 4 steps, packed documents, complementary views, a chunked
    head and activation checkpointing: everything composing with the 2L pass."""
    return [f"data.path={demo_data / 'shards'}", f"data.tokenizer={demo_data / 'tokenizer.json'}",
            "data.document_mask=true", "objective=block", "objective.var_len_prob=0",
            "objective.complementary=true", "objective.loss_chunk_rows=16", PHASES,
            "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.precision=fp32",
            "model.activation_checkpointing=true", "logging.log_every=1",
            "logging.progress_bar=false", "schedule.peak_lr=3e-3", "schedule.warmup_steps=2"]


@pytest.fixture(scope="module")
def curriculum_runs(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    # the whole run also checkpoints at step 2; "cut" resumes from that checkpoint with the
    # same command (no second run re-training steps 1-2)
    common = [*curriculum_args(demo_data), "trainer.micro_batch_size=2", "trainer.max_steps=4",
              "trainer.save_every=2"]
    whole = cli("llada-pretrain", [f"run_dir={root / 'whole'}", *common])
    cut = branch_at(root / "whole", 2, root / "cut")
    resumed = cli("llada-pretrain", [f"run_dir={cut}", *common])
    return root, whole, resumed


@pytest.mark.slow
def test_curriculum_resumes_exactly_across_a_transition(curriculum_runs):
    root, whole, resumed = curriculum_runs
    rows = metrics(root / "whole")
    assert [r["block_size"] for r in rows] == [4, 8, 0, 8]
    for line in ("block size 4 at step 1", "block size 4 -> 8 at step 2", "block size 8 -> L at step 3",
                 "block size L -> 8 at step 4"):
        assert line in whole.stdout, line
    # stopped after step 2, at the 8 -> L transition; the resumed steps are bit for bit the same
    assert "resumed from" in resumed.stdout and "block size L at step 3" in resumed.stdout
    got = {r["step"]: r["loss"] for r in metrics(root / "cut")}
    assert [got[s] for s in range(1, 5)] == [r["loss"] for r in rows]


@pytest.mark.slow
def test_curriculum_export_is_a_block_model_and_plots(curriculum_runs, tmp_path):
    root, _, _ = curriculum_runs
    config = json.loads((root / "whole" / "export" / "config.json").read_text())
    assert config["block_size"] == 8  # the last phase: inference runs block-causal, blocks of 8
    from transformers import AutoModel

    from llada_train.model import load_pretrained

    hf = AutoModel.from_pretrained(root / "whole" / "export", trust_remote_code=True).eval()
    ours = load_pretrained(root / "whole" / "export").eval()
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)  # config.block_size = 8: the block-causal inference mask
        assert not torch.allclose(want, ours(ids, block_size=0), atol=1e-4)  # it is not full
        got = hf(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the offline exporter records the same block size from the run's config
    cli("llada-export", ["--run-dir", str(root / "whole"), "--out", str(tmp_path / "offline")])
    assert json.loads((tmp_path / "offline" / "config.json").read_text())["block_size"] == 8
    out = tmp_path / "curves.png"
    cli("llada-plot", [str(root / "whole"), "--out", str(out)])
    assert out.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.isa
def test_block_on_two_zero3_ranks_matches_one_rank(curriculum_runs, demo_data, tmp_path):
    """Keyed masks: the curriculum run on 2 ZeRO-3 ranks x 1 row x 2 accumulation steps
    trains the 1-rank run's losses (2 rows x 2 steps), transitions included."""
    root, _, _ = curriculum_runs
    run(torchrun_cmd("llada_train.cli.pretrain", [
        f"run_dir={tmp_path / 'two'}", *curriculum_args(demo_data), "trainer.micro_batch_size=1",
        "deepspeed=zero3", "trainer.max_steps=4", "trainer.export_at_end=false"]))
    want = [r["loss"] for r in metrics(root / "whole")]
    assert [r["loss"] for r in metrics(tmp_path / "two")] == pytest.approx(want, rel=2e-5)


@pytest.mark.slow
def test_block_sft_with_lora_from_a_block_export(curriculum_runs, demo_data, tmp_path):
    root, _, _ = curriculum_runs
    run_dir = tmp_path / "sft"
    cli("llada-sft", [f"run_dir={run_dir}", f"init_from={root / 'whole' / 'export'}",
                      f"data.path={demo_data / 'sft'}", f"data.tokenizer={demo_data / 'tokenizer.json'}",
                      "objective=block", "objective.block_size=8", "objective.complementary=true",
                      "peft=lora", "trainer.max_steps=2", "trainer.epochs=0", "trainer.seq_len=128",
                      "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                      "schedule=sft_demo", "logging.log_every=1", "logging.progress_bar=false"])
    losses = [r["loss"] for r in metrics(run_dir)]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert json.loads((run_dir / "export" / "config.json").read_text())["block_size"] == 8
