"""The masked-row chunked loss under ZeRO-3 on 2 gloo ranks: loss and gradients equal the
full-logits formula on a plain model, with the head's parameters really partitioned and the
ranks holding different numbers of masked rows (one of them none)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llada_train.diffusion import ObjectiveConfig, PretrainObjective, SFTObjective
from tests.dist_utils import run_distributed
from tests.test_objective import MASK, assert_rel_close, old_pretrain_loss, old_sft_loss, tiny_model


def _batches(rank: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(100 + rank)
    pre = {"input_ids": torch.randint(8, 97, (2, 16 + 8 * rank), generator=g)}  # widths differ
    x0 = torch.randint(8, 97, (2, 12), generator=g)
    # rank 1: prompts cover everything, so it has no masked row at all
    prompt_len = torch.tensor([3, 6]) if rank == 0 else torch.tensor([12, 12])
    return pre, {"input_ids": x0, "prompt_len": prompt_len}


def _zero3_rank() -> None:
    import deepspeed

    from llada_train.train.build import build_model
    from llada_train.train.distributed import DeepSpeedConfig, render_deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = tiny_model(seed=0)
    # threshold 0: even the small head and ln_f are partitioned, as the 8B head would be
    ds_cfg = render_deepspeed_config(
        DeepSpeedConfig(zero_stage=3, stage3_param_persistence_threshold=0),
        global_batch=2 * world, micro_batch=2, world_size=world, grad_clip=0.0, bf16=False,
    )
    model = build_model(ref.config, 3, ds_cfg, seed=0, init_from=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # client optimizer: no fused_adam JIT
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    head_w = engine.module.transformer.ff_out.weight
    assert hasattr(head_w, "ds_id") and head_w.data.numel() == 0  # partitioned outside forward

    pre, sft = _batches(rank)
    cases = [
        (PretrainObjective(ObjectiveConfig(var_len_prob=0.0, loss_chunk_rows=4), MASK), old_pretrain_loss, pre),
        (SFTObjective(ObjectiveConfig(name="sft", loss_chunk_rows=3), MASK), old_sft_loss, sft),
    ]
    for objective, old_fn, batch in cases:
        ref.zero_grad(set_to_none=True)
        ref_loss = old_fn(ref, batch, torch.Generator().manual_seed(rank), objective.cfg)
        ref_loss.backward()
        out = objective(engine, batch, torch.Generator().manual_seed(rank))
        assert_rel_close(out.loss.detach(), ref_loss.detach(), what=f"rank {rank} loss")
        counts = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
        dist.all_gather(counts, out.num_masked.reshape(()).clone())
        assert counts[0] != counts[1], counts  # the ranks ran different numbers of chunks
        engine.backward(out.loss)
        for (name, p), ref_p in zip(engine.module.named_parameters(), ref.parameters(), strict=True):
            full = deepspeed.utils.safe_get_full_grad(p)  # the mean over ranks (a collective)
            expected = ref_p.grad.clone()
            dist.all_reduce(expected)
            assert_rel_close(full, expected / world, what=f"rank {rank} grad {name}")
        engine.step()


@pytest.mark.slow
@pytest.mark.isa
def test_masked_row_loss_and_grads_under_zero3_match_full_logits():
    run_distributed(_zero3_rank, world_size=2, timeout_s=300)
