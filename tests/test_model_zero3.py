"""The fused model path under ZeRO-3 on 2 gloo ranks: built inside ``zero.Init`` (RoPE table
made lazily on the real device), GQA, selective checkpointing of every other block; logits
and gradients equal a plain eager model's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llada_train.model import LLaDAModel, ModelConfig
from tests.dist_utils import run_distributed


def _config(**kw) -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                       vocab_size=40, mask_token_id=2, **kw)


def _zero3_rank() -> None:
    import deepspeed

    from llada_train.train.distributed import DeepSpeedConfig, render_deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = LLaDAModel(_config())
    ref.init_weights(torch.Generator().manual_seed(0))
    ds_cfg = render_deepspeed_config(
        DeepSpeedConfig(zero_stage=3, stage3_param_persistence_threshold=0),
        global_batch=2 * world, micro_batch=2, world_size=world, grad_clip=0.0, bf16=False,
    )
    for policy in ("full", "save_matmuls"):
        ref.zero_grad(set_to_none=True)
        _check_policy(policy, ref, ds_cfg, rank, world)


def _check_policy(policy: str, ref: LLaDAModel, ds_cfg: dict, rank: int, world: int) -> None:
    import deepspeed

    from llada_train.train.build import build_model

    cfg = _config(activation_checkpointing=True, checkpoint_every=2, checkpoint_policy=policy)
    model = build_model(cfg, 3, ds_cfg, seed=0, init_from=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # client optimizer: no JIT build
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    engine.train()
    ids = torch.randint(0, 40, (2, 9 + rank), generator=torch.Generator().manual_seed(rank))
    logits = engine(ids)
    ref_logits = ref(ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    engine.backward(logits.pow(2).mean())
    ref_logits.pow(2).mean().backward()
    for (name, p), ref_p in zip(engine.module.named_parameters(), ref.parameters(), strict=True):
        full = deepspeed.utils.safe_get_full_grad(p)  # the mean over ranks (a collective)
        expected = ref_p.grad.clone()
        dist.all_reduce(expected)
        msg = f"{policy}: {name}"
        torch.testing.assert_close(full, expected / world, rtol=1e-5, atol=1e-7, msg=msg)
    assert list(engine.module.rope.tables) == [torch.device("cpu")]


@pytest.mark.slow
@pytest.mark.isa
def test_checkpointed_gqa_model_under_zero3_matches_plain():
    run_distributed(_zero3_rank, world_size=2, timeout_s=300)
