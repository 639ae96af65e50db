"""The MoE expert bias stays fp32 under ZeRO-3 + bf16 (issue 22): 2 gloo ranks train a tiny
LLaDA2-style model from a folder whose biases lie in [0.5, 1), where bf16's spacing (2^-8)
is wider than twice the preset's update rate (1e-3). A bias stored in bf16 (what zero.Init
does to every parameter) would lose every update there; the fp32 buffer keeps them through
training, checkpoint, exact resume, the export and ``bias_absmax``."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from llada_train.model import LLaDAModel, ModelConfig, save_pretrained
from llada_train.train.safe_load import torch_load
from tests.launch_utils import branch_at, cli, metrics, run, torchrun_cmd

pytestmark = pytest.mark.slow  # two 2-rank DeepSpeed runs

STEPS, CUT, RATE = 4, 2, 1e-3
LAYERS = (1, 2)  # tiny_moe_llada2: layer 0 is dense
NAMES = [f"model.transformer.blocks.{i}.moe.router.expert_bias" for i in LAYERS]


def _init_bias(layer: int) -> torch.Tensor:
    """(8,) fp32 values in [0.5, 1) off the bf16 grid, distinct enough to steer routing."""
    return 0.6 + 0.013 * torch.arange(8, dtype=torch.float32) + 0.001 * layer


def _args(demo_data, run_dir, init, steps: int, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}", f"init_from={init}", f"data.path={demo_data / 'shards'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}", "model=tiny_moe_llada2",
        f"trainer.max_steps={steps}", "trainer.seq_len=64", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.precision=bf16", "deepspeed=zero3",
        f"model.router_bias_update_rate={RATE}", "schedule.warmup_steps=2", "logging.log_every=1",
        "logging.progress_bar=false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """An init folder with large fp32 biases; a whole run; a run resumed from its step CUT."""
    import yaml

    from tests.conftest import REPO

    root = tmp_path_factory.mktemp("moe_bias_zero3")
    cfg = ModelConfig(**yaml.safe_load((REPO / "conf/model/tiny_moe_llada2.yaml").read_text()))
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    state = model.state_dict()
    for layer, name in zip(LAYERS, NAMES, strict=True):
        state[name] = _init_bias(layer)
    save_pretrained(state, cfg, root / "init")
    # the whole run also checkpoints at CUT; "cut" resumes from that checkpoint with the same
    # command (no third 2-rank run re-training the steps before CUT)
    def launch(run_dir):
        args = _args(demo_data, run_dir, root / "init", STEPS, f"trainer.save_every={CUT}")
        run(torchrun_cmd("llada_train.cli.pretrain", args))

    launch(root / "whole")
    launch(branch_at(root / "whole", CUT, root / "cut"))
    return root


def _exported(run_dir) -> dict[str, torch.Tensor]:
    with safe_open(run_dir / "export" / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in NAMES}


def test_bias_updates_below_bf16_spacing_are_kept(runs):
    exported = _exported(runs / "whole")
    for layer, name in zip(LAYERS, NAMES, strict=True):
        bias = exported[name]  # (8,)
        assert bias.dtype == torch.float32, name
        assert not torch.equal(bias, bias.bfloat16().float()), name  # off the bf16 grid
        assert (bias.abs() >= 0.5).all(), name  # where bf16 would round a 1e-3 step away
        # each step moves each bias by -RATE, 0 or +RATE: the drift is a whole number of steps
        moved = (bias.double() - _init_bias(layer).double()) / RATE  # (8,)
        assert (moved - moved.round()).abs().max() < 1e-3, (name, moved)
        assert moved.abs().max() <= STEPS + 1e-3, (name, moved)
        assert (moved.round() != 0).any(), (name, moved)  # updates were applied, not lost


def test_bias_absmax_is_logged_under_zero3(runs):
    last = metrics(runs / "whole")[-1]
    for layer, bias in zip(LAYERS, _exported(runs / "whole").values(), strict=True):
        # the logged float is the fp32 buffer's, the one exported
        assert last[f"moe/L{layer}/bias_absmax"] == float(bias.abs().max())


def test_resume_is_exact_and_ranks_hold_the_same_bias(runs):
    whole = [r["loss"] for r in metrics(runs / "whole")]
    cut = [r["loss"] for r in metrics(runs / "cut")]
    assert len(whole) == STEPS and cut == whole  # same machine: bit-identical
    want = _exported(runs / "whole")
    for name, bias in _exported(runs / "cut").items():
        assert torch.equal(bias, want[name]), name
    # every rank's checkpoint holds its own whole fp32 copy of the bias: all equal
    step = runs / "cut" / "checkpoints" / f"step_{STEPS:08d}"
    for r in (0, 1):
        module = torch_load(step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                            map_location="cpu")["module"]  # fmt: skip
        for name in NAMES:
            assert module[name].dtype == torch.float32 and torch.equal(module[name], want[name])


def test_offline_export_and_load_keep_the_fp32_bias(runs, tmp_path):
    """``llada-export`` from the ZeRO-3 shards, and ``load_pretrained`` (bf16 model included),
    give the bias the run exported, in fp32."""
    from llada_train.model import load_pretrained
    from llada_train.model.moe import moe_layers

    cli("llada-export", ["--run-dir", str(runs / "cut"), "--out", str(tmp_path / "offline")])
    want = _exported(runs / "whole")
    with safe_open(tmp_path / "offline" / "model.safetensors", framework="pt") as f:
        for name in NAMES:
            assert torch.equal(f.get_tensor(name), want[name]), name
    model = load_pretrained(runs / "whole" / "export", dtype=torch.bfloat16)
    got = [m.router.expert_bias for m in moe_layers(model)]
    assert [b.dtype for b in got] == [torch.float32] * 2
    assert all(torch.equal(b, want[n]) for b, n in zip(got, NAMES, strict=True))
