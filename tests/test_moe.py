"""Mixture-of-experts units: routers by hand, grouped-mm vs loop, balancing, partial RoPE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, ModelConfig
from llada_train.model.layers import RopeTable, apply_rotary
from llada_train.model.moe import (
    MoEFeedForward,
    Router,
    RouterSpec,
    expert_metrics,
    grouped_mm_usable,
    moe_layers,
    route_llada2,
    route_lladamoe,
    update_expert_bias,
)

TINY_MOE = dict(
    d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, mlp_hidden_size=96,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
)  # fmt: skip


def _logits_for(scores: list[float], kind: str) -> torch.Tensor:
    """Logits (1, E) whose sigmoid (llada2) or softmax (lladamoe) gives ``scores``."""
    s = torch.tensor([scores], dtype=torch.float64)
    return (torch.log(s / (1 - s)) if kind == "llada2" else torch.log(s)).float()


def test_llada2_router_by_hand() -> None:
    # s = sigmoid(logits) = [0.5, 0.75, 0.25, 0.8]; bias lifts expert 2 to 0.65 (biased)
    logits = _logits_for([0.5, 0.75, 0.25, 0.8], "llada2")
    bias = torch.tensor([0.0, 0.0, 0.4, 0.0])
    # groups {0,1} and {2,3}: top-2 sums 1.25 and 1.45 -> only group 1 is kept, so the
    # picks are 3 (0.8) and 2 (0.65 biased); weights from the unbiased s: 0.8 and 0.25,
    # renormalised to 0.8/1.05 and 0.25/1.05, times the scaling 2
    w, e = route_llada2(logits, bias, RouterSpec(top_k=2, n_group=2, topk_group=1, scaling=2.0))
    assert e.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([[1.6 / 1.05, 0.5 / 1.05]]))
    # one group: experts 3 (0.8) and 1 (0.75 > 0.65) win; weights 0.8 and 0.75 over 1.55
    w, e = route_llada2(logits, bias, RouterSpec(top_k=2, n_group=1, topk_group=1, scaling=2.0))
    assert e.tolist() == [[3, 1]]
    torch.testing.assert_close(w, torch.tensor([[1.6 / 1.55, 1.5 / 1.55]]))


def test_lladamoe_router_by_hand() -> None:
    # softmax = [0.1, 0.2, 0.3, 0.4]; bias 0.25 on expert 0 -> biased [0.35, 0.2, 0.3, 0.4]:
    # experts 3 and 0, and the biased values themselves are the weights (sum 0.75, kept)
    logits = _logits_for([0.1, 0.2, 0.3, 0.4], "lladamoe")
    bias = torch.tensor([0.25, 0.0, 0.0, 0.0])
    w, e = route_lladamoe(logits, bias, RouterSpec(top_k=2, scaling=2.5))
    assert e.tolist() == [[3, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.35]]))


def test_router_logits_are_fp32_in_a_bf16_model() -> None:
    router = Router(4, 4, "llada2", RouterSpec(top_k=2, n_group=2, topk_group=1, scaling=2.0))
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = _logits_for([0.5, 0.75, 0.25, 0.8], "llada2")[0]
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.4, 0.0]))
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16 and router.expert_bias.dtype == torch.float32
    # one-hot tokens pick one column of the weight: token 0 gets the logits above
    w, e = router(torch.eye(4, dtype=torch.bfloat16)[:1])
    assert w.dtype == torch.float32 and e.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([[1.6 / 1.05, 0.5 / 1.05]]), atol=2e-2, rtol=0)


def _moe(impl: str, router: str = "llada2", seed: int = 0) -> MoEFeedForward:
    spec = RouterSpec(top_k=2, n_group=2, topk_group=1, scaling=2.5)
    moe = MoEFeedForward(16, 4, 8, router, spec, impl=impl)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (moe.gate_proj, moe.up_proj, moe.down_proj, moe.router.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


def _reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every token through its k experts one by one: the definition, no sorting."""
    flat = x.reshape(-1, x.shape[-1])
    w, e = moe.router(flat)
    rows = []
    for t in range(flat.shape[0]):
        acc = torch.zeros(flat.shape[1])
        for j in range(e.shape[1]):
            i = int(e[t, j])
            h = F.silu(moe.gate_proj[i] @ flat[t]) * (moe.up_proj[i] @ flat[t])
            acc = acc + w[t, j] * (moe.down_proj[i] @ h)
        rows.append(acc)
    return torch.stack(rows).view(x.shape)


def test_sorted_experts_equal_the_per_token_definition() -> None:
    moe = _moe("loop")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe(x), _reference(moe, x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("router", ["llada2", "lladamoe"])
def test_grouped_mm_and_loop_agree_in_outputs_and_gradients(router: str) -> None:
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    assert grouped_mm_usable(x, [torch.empty(4, 8, 16), torch.empty(4, 16, 8)])
    results = []
    for impl in ("grouped_mm", "loop"):
        moe, xi = _moe(impl, router), x.clone().requires_grad_()
        with torch.no_grad():  # one expert gets no token: the empty group must work too
            moe.router.expert_bias[1] = -10.0
        out = moe(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
        grads = [
            xi.grad,
            moe.gate_proj.grad,
            moe.up_proj.grad,
            moe.down_proj.grad,
            moe.router.weight.grad,
        ]
        results.append((out.detach(), grads))
    (out_g, grads_g), (out_l, grads_l) = results
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_g, grads_l, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads_l[1][1].abs().sum() == 0  # the starved expert got no gradient


def test_load_counted_once_per_pass_even_when_recomputed() -> None:
    moe = _moe("loop").train()
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    checkpoint(moe, x, use_reentrant=False).sum().backward()  # forward re-run in backward
    assert moe.expert_load.sum().item() == 4 * 6 * 2  # N tokens x top-2, once
    with torch.no_grad():
        moe(x)  # inference passes are not counted
    assert moe.expert_load.sum().item() == 4 * 6 * 2


def test_bias_update_moves_load_toward_balance() -> None:
    moe = MoEFeedForward(16, 4, 8, "llada2", RouterSpec(top_k=1), bias_update_rate=0.01).train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # feature 0 is constant and pushes every token toward expert 0
        for p in (moe.gate_proj, moe.up_proj, moe.down_proj, moe.router.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        moe.router.weight[0, 0] = 3.0
    x = torch.randn(4, 64, 16, generator=g)
    x[..., 0] = 1.0
    ratios = []
    for step in range(80):
        with torch.enable_grad():
            moe(x)
        before = moe.expert_load.clone()
        update_expert_bias(moe)
        assert moe.expert_load.sum() == 0  # consumed
        ratios.append(float(before.max() / before.mean()))
        if step == 0:  # the crowded expert goes down, the others up
            over = before > before.mean()
            assert (moe.router.expert_bias[over] < 0).all()
            assert (moe.router.expert_bias[~over] > 0).all()
    assert ratios[0] > 2.5, ratios[0]  # expert 0 takes most of the 256 tokens
    late = sum(ratios[-10:]) / 10
    assert late < 1.5, f"load max/mean {late:.2f} after balancing (started at {ratios[0]:.2f})"


def test_model_metrics_name_layers_and_bias_survives_bf16() -> None:
    cfg = ModelConfig(**TINY_MOE, router_bias_update_rate=0.01)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.train()
    model(torch.randint(0, 96, (2, 12))).float().mean().backward()
    update_expert_bias(model)
    metrics = expert_metrics(model)
    assert set(metrics) == {
        f"moe/L{i}/{k}" for i in (1, 2) for k in ("load_max_mean", "bias_absmax")
    }
    assert all(v >= 1.0 for k, v in metrics.items() if k.endswith("load_max_mean"))
    assert metrics["moe/L1/bias_absmax"] == pytest.approx(0.01)
    model.to(torch.bfloat16)
    assert {m.router.expert_bias.dtype for m in moe_layers(model)} == {torch.float32}


def test_bad_expert_configs_are_one_line_errors() -> None:
    with pytest.raises(LladaError, match="num_experts=8 is not divisible into n_group=3"):
        ModelConfig(**TINY_MOE, n_group=3)
    with pytest.raises(LladaError, match="num_experts_per_tok=9"):
        ModelConfig(**{**TINY_MOE, "num_experts_per_tok": 9})
    with pytest.raises(LladaError, match="router='topk'"):
        ModelConfig(**TINY_MOE, router="topk")
    with pytest.raises(LladaError, match="fewer than num_experts_per_tok"):
        ModelConfig(**{**TINY_MOE, "num_experts_per_tok": 3}, n_group=4, topk_group=1)


def test_partial_rope_rotates_the_leading_features_with_their_own_frequencies() -> None:
    head_dim, factor, theta, L = 16, 0.5, 10000.0, 5
    cfg = ModelConfig(**TINY_MOE, partial_rotary_factor=factor)
    assert cfg.rotary_dim == 8
    x = torch.randn(1, 2, L, head_dim, generator=torch.Generator().manual_seed(6))
    cos, sin = RopeTable(cfg.rotary_dim, theta, 16).get(0, L, x.device)
    out = apply_rotary(x, cos, sin)
    # the released formula: frequencies over the rotary width, rotate-half on that slice
    w = 8
    inv = 1.0 / theta ** (torch.arange(0, w, 2, dtype=torch.float64) / w)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv  # (L, w/2)
    c, s = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    xr = x[..., :w].double()
    rot = torch.cat([-xr[..., w // 2 :], xr[..., : w // 2]], -1)
    torch.testing.assert_close(out[..., :w], (xr * c + rot * s).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[..., w:], x[..., w:])  # the pass-through half is untouched
    assert not math.isclose(float((out[..., :w] - x[..., :w]).abs().max()), 0.0)


# LLaDA2.0-mini (dFactory configs/model_configs/llada2_mini/config.json): 20 layers, d 2048,
# 16 heads / 4 kv heads of 128, dense layer 0 (5120), then 256 experts of 512, top-8, one
# shared expert, vocab 157184
LLADA2_MINI = dict(
    d_model=2048, n_layers=20, n_heads=16, n_kv_heads=4, mlp_hidden_size=5120, vocab_size=157184,
    qk_norm=True, partial_rotary_factor=0.5, num_experts=256, num_experts_per_tok=8,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, first_k_dense_replace=1,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, mask_token_id=156895,
)  # fmt: skip


def test_flops_count_the_active_experts_of_the_tiny_preset_by_hand() -> None:
    import yaml

    from llada_train.model import count_parameters
    from llada_train.train.metrics import flops_per_token, non_embedding_parameters
    from tests.conftest import REPO

    cfg = ModelConfig(**yaml.safe_load((REPO / "conf/model/tiny_moe_llada2.yaml").read_text()))
    attn, norms = 128 * 32 * (8 + 4), 2 * 128 + 2 * 32  # q/out 4 heads, k/v 2 heads of 32
    dense = 3 * 128 * 384  # layer 0
    shared, router = 3 * 128 * 64, 128 * 8
    expert = 3 * 128 * 64
    head = 128 + 128 * 512  # ln_f + output head
    active = 3 * (attn + norms) + dense + 2 * (shared + router + 2 * expert) + head
    total = 3 * (attn + norms) + dense + 2 * (shared + router + 8 * expert) + head
    assert (active, total) == (511_040, 805_952)
    assert non_embedding_parameters(cfg, active=True) == active
    assert non_embedding_parameters(cfg) == total
    assert count_parameters(cfg) == total + 512 * 128 + 2 * 8  # + embedding + expert biases
    assert flops_per_token(cfg, 64) == 6 * active + 12 * 3 * 128 * 64


def test_flops_of_llada2_mini_count_its_published_active_parameters() -> None:
    from llada_train.train.metrics import flops_per_token, non_embedding_parameters

    cfg = ModelConfig(**LLADA2_MINI)
    attn, norms = 2048 * 128 * (32 + 8), 2 * 2048 + 2 * 128
    routed_layer = 3 * 2048 * 512 + 2048 * 256 + 8 * 3 * 2048 * 512  # shared, router, top-8
    body = 20 * (attn + norms) + 3 * 2048 * 5120 + 19 * routed_layer
    assert body + 2048 == 789_142_528  # Ling-mini-2.0's "789M non-embedding active"
    head = 2048 * 157184
    assert non_embedding_parameters(cfg, active=True) == body + 2048 + head
    total = non_embedding_parameters(cfg) + 2048 * 157184  # + the embedding table
    assert total == 16_255_638_528  # "16B total"
    assert flops_per_token(cfg, 4096) == 6 * (body + 2048 + head) + 12 * 20 * 2048 * 4096


def test_memory_plan_moe_rows_by_hand() -> None:
    import importlib.util
    import sys

    from llada_train.model import count_parameters
    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "memory_plan", REPO / "scripts" / "memory_plan.py"
    )
    plan = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = plan  # dataclasses look their module up by name
    spec.loader.exec_module(plan)
    for name in plan.MOE_MODELS:
        assert plan.moe_shape(name).params == count_parameters(plan.moe_config(name))
    assert plan.moe_shape("LLaDA2.0-mini").params == 16_255_638_528 + 19 * 256  # + expert biases
    zero3, ep = plan.comm_gb_per_micro_step("LLaDA2.0-mini", gpus=8, tokens_per_gpu=16384)
    total = 16_255_638_528 + 19 * 256
    assert zero3 == pytest.approx(6 * total * 7 / 8 / 1e9)  # gather fwd + bwd, reduce-scatter
    experts = 19 * 256 * 3 * 2048 * 512  # stay on their GPU under expert parallelism
    a2a = 2 * 2 * 19 * 16384 * 8 * 2048 * 2 * 7 / 8  # dispatch + combine, fwd + bwd, bf16
    assert ep == pytest.approx((6 * (total - experts) * 7 / 8 + a2a) / 1e9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_moe_matches_eager(dtype: torch.dtype) -> None:
    # under torch.compile grouped-mm takes bf16 only (its fake kernel); fp32 takes the loop
    moe = _moe("auto").to(dtype).train()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    want = moe(x)
    moe.compile(backend="aot_eager")
    got = moe(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert moe.expert_load.sum().item() == 2 * (2 * 6 * 2)  # both passes counted once each


def test_lora_targets_naming_the_stacked_experts_get_their_own_line() -> None:
    from llada_train.model.lora import resolve_targets

    model = LLaDAModel(ModelConfig(**TINY_MOE))
    with pytest.raises(LladaError, match=r"names the routed experts .*moe\.gate_proj.*cannot wrap"):
        resolve_targets(model, ["gate_proj"])
    chosen = resolve_targets(model, ["q_proj", "up_proj"])  # up_proj: the dense/shared Linear
    assert all(".moe." not in name for name in chosen) and len(chosen) >= TINY_MOE["n_layers"]
