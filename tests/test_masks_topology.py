"""Masks derived from (seed, step, global sample index): independent of ranks and micro-batches."""

from __future__ import annotations

import pytest
import torch

from llada_train.data import PretrainDataConfig, build_pretrain_reader
from llada_train.diffusion.forward import NoiseKey
from llada_train.diffusion.losses import ObjectiveConfig, PretrainObjective, SFTObjective
from tests.conftest_data import counting_shards
from tests.launch_utils import cli, metrics, run, torchrun_cmd

MASK = 2


def pretrain_draw(batch, key, cut=0.5):
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=cut), MASK)
    x0, noisy, masked, w = obj.draw(batch, key)
    return noisy, masked, 1 / (w * x0.numel())  # p per row


def test_split_batches_draw_the_same_masks_and_cut_as_the_whole():
    ids = torch.randint(3, 50, (4, 24), generator=torch.Generator().manual_seed(0))
    index = torch.arange(100, 104)
    for step in range(12):  # var_len_prob 0.5: some steps cut, all agree on the length
        key = NoiseKey(seed=5, step=step)
        whole = pretrain_draw({"input_ids": ids, "sample_index": index}, key)
        halves = [pretrain_draw({"input_ids": ids[a:a + 2], "sample_index": index[a:a + 2]}, key)
                  for a in (0, 2)]
        for j in range(3):
            assert torch.equal(whole[j], torch.cat([h[j] for h in halves]))
    lengths = {pretrain_draw({"input_ids": ids, "sample_index": index},
                             NoiseKey(5, s))[0].shape[1] for s in range(12)}
    assert 24 in lengths and len(lengths) > 1  # the cut happens, for the whole batch at once


def test_draws_depend_on_seed_step_and_index():
    ids = torch.randint(3, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    base = pretrain_draw({"input_ids": ids, "sample_index": torch.tensor([0, 1])}, NoiseKey(0, 0), 0)
    for batch, key in [({"sample_index": torch.tensor([2, 3])}, NoiseKey(0, 0)),
                       ({"sample_index": torch.tensor([0, 1])}, NoiseKey(0, 1)),
                       ({"sample_index": torch.tensor([0, 1])}, NoiseKey(1, 0))]:
        other = pretrain_draw({"input_ids": ids, **batch}, key, 0)
        assert not torch.equal(base[1], other[1])


def test_sft_masks_follow_the_sample_index_and_spare_the_prompt():
    obj = SFTObjective(ObjectiveConfig(name="sft", p_uncond=0.3), MASK)
    ids = torch.randint(3, 50, (4, 20), generator=torch.Generator().manual_seed(1))
    plen = torch.tensor([3, 5, 2, 7])
    index = torch.arange(8, 12)
    key = NoiseKey(0, 3)
    whole = obj.draw({"input_ids": ids, "prompt_len": plen, "sample_index": index}, key)
    part = obj.draw({"input_ids": ids[2:], "prompt_len": plen[2:], "sample_index": index[2:]}, key)
    assert torch.equal(whole[1][2:], part[1]) and torch.equal(whole[2][2:], part[2])
    assert not any(bool(whole[2][r, : plen[r]].any()) for r in range(4))


def test_a_reader_resumed_on_another_world_size_continues_the_same_samples(tmp_path):
    counting_shards(tmp_path / "s", [4096])
    cfg = PretrainDataConfig(path=str(tmp_path / "s"), tokenizer=None)
    one, _ = build_pretrain_reader(cfg, 16, micro_batch_size=4, seed=0, rank=0, world_size=1)
    for _ in range(3):
        next(one)
    state = one.state_dict()
    expected = next(one)
    halves = []
    for rank in (0, 1):
        r, _ = build_pretrain_reader(cfg, 16, micro_batch_size=2, seed=0, rank=rank, world_size=2)
        r.load_state_dict(state)
        halves.append(next(r))
    for k in ("input_ids", "sample_index"):
        assert torch.equal(expected[k], torch.cat([h[k] for h in halves]))
    # hence the same masks: they are a function of (seed, step, sample_index) only
    key = NoiseKey(0, 3)
    assert torch.equal(pretrain_draw(expected, key, 0)[1],
                       torch.cat([pretrain_draw(h, key, 0)[1] for h in halves]))


# the runs below: 4 steps of 8 sequences, held-out ELBO at steps 2 and 4
TOPOLOGY = ["trainer.seq_len=32", "trainer.global_batch_size=8", "trainer.max_steps=4",
            "trainer.precision=fp32", "objective.var_len_prob=0.3", "logging.log_every=1",
            "logging.progress_bar=false", "trainer.export_at_end=false", "schedule.peak_lr=4e-4",
            "data.val_fraction=0.05", "trainer.eval_every=2", "trainer.eval_windows=3",
            "trainer.eval_samples_per_window=2"]


@pytest.fixture(scope="module")
def topology_runs(demo_data, tmp_path_factory):
    """One data and schedule set-up on several topologies; both tests below read these runs.

    a: 1 rank, micro-batch 8 (the reference); c: 2 ranks x micro-batch 2 x accumulation 2;
    d: 2 ZeRO-3 ranks x micro-batch 4 (the validation's 3 windows: one rank pads a dummy);
    moved: 1 rank x micro-batch 4 x accumulation 2 for steps 1-2 (and the held-out ELBO at
    step 2), whose checkpoint 2 ranks x micro-batch 4 resume for steps 3-4.
    """
    root = tmp_path_factory.mktemp("topology")
    common = [f"data.path={demo_data / 'shards'}", f"data.tokenizer={demo_data / 'tokenizer.json'}",
              *TOPOLOGY]
    cli("llada-pretrain", [f"run_dir={root / 'a'}", *common, "trainer.micro_batch_size=8"])
    run(torchrun_cmd("llada_train.cli.pretrain",
                     [f"run_dir={root / 'c'}", *common, "trainer.micro_batch_size=2"]))
    run(torchrun_cmd("llada_train.cli.pretrain",
                     [f"run_dir={root / 'd'}", *common, "trainer.micro_batch_size=4",
                      "deepspeed=zero3"]))
    # one rank writes the step-2 checkpoint (a later max_steps moves no step: constant schedule)
    cli("llada-pretrain", [f"run_dir={root / 'moved'}", *common, "trainer.micro_batch_size=4",
                           "trainer.max_steps=2"])
    run(torchrun_cmd("llada_train.cli.pretrain",
                     [f"run_dir={root / 'moved'}", *common, "trainer.micro_batch_size=4"]))
    return {name: metrics(root / name) for name in ("a", "c", "d", "moved")}


def _same_rows(rows, ref, steps, who):
    for key in ("loss", "val_loss", "val_loss_se"):
        want = [m[key] for m in ref if key in m and m["step"] in steps]
        got = [m[key] for m in rows if key in m and m["step"] in steps]
        assert got == pytest.approx(want, rel=2e-5), (who, key)


@pytest.mark.slow
def test_one_rank_two_ranks_and_micro_batch_sizes_give_the_same_losses(topology_runs):
    """Also the validation: split over two ZeRO-3 ranks (3 windows: one rank pads a dummy)."""
    ref = topology_runs["a"]
    assert len(ref) == 4 and [m["step"] for m in ref if "val_loss" in m] == [2, 4]
    # 2 ranks x accumulation 2 and 2 ZeRO-3 ranks x accumulation 1, all 4 steps
    for other in ("c", "d"):
        _same_rows(topology_runs[other], ref, (1, 2, 3, 4), other)
    # 1 rank x accumulation 2: the resumed run's first part (steps 1-2, ELBO at step 2)
    _same_rows(topology_runs["moved"], ref, (1, 2), "1 rank x micro-batch 4")


@pytest.mark.slow
def test_a_run_resumed_on_another_world_size_continues_the_same_masks_and_data(topology_runs):
    rows = topology_runs["moved"]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]  # steps 3 and 4 on two ranks
    # the uninterrupted run's losses (and step 4's held-out ELBO) carry on across the move
    _same_rows(rows, topology_runs["a"], (1, 2, 3, 4), "resumed on 2 ranks")
