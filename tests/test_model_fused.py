"""The fusion-friendly model path against the plain eager formulas written out here.

RMSNorm via ``F.rms_norm``, one RoPE table sliced per length, native GQA in SDPA, flash-attn
resolved at build, compiled blocks, selective activation checkpointing (issue 12 item 3).
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from llada_train.model import LLaDAModel, ModelConfig, load_pretrained, save_pretrained
from llada_train.model import layers as layers_mod
from llada_train.model import transformer as transformer_mod
from llada_train.model.layers import RMSNorm, RopeTable, attend, rotary_cos_sin
from llada_train.train.build import RUNTIME_FIELDS, build_model, resolve_model_config

CPU = torch.device("cpu")


def small_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=40,
                mask_token_id=2, max_sequence_length=64)
    return ModelConfig(**{**base, **kw})


def built(cfg: ModelConfig, seed: int = 0) -> LLaDAModel:
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaDA's formula: normalise in fp32, cast back to the input dtype, then scale."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_attention(q, k, v, key_mask):
    """softmax(q k^T / sqrt(d)) v over full-head k, v (each kv head serves H / H_kv q heads)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    out = scores.softmax(-1) @ v  # (B, H, Lq, hd)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def grads_of(model: LLaDAModel, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(ids)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_llada_cast_order(dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=gen))
    norm = norm.to(dtype)
    x = (3 * torch.randn(4, 9, 64, generator=gen)).to(dtype).requires_grad_()
    out = norm(x)
    ref = reference_rms_norm(x, norm.weight, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:  # gradients of the fused op equal the formula's
        upstream = torch.randn(out.shape, generator=gen)
        got = torch.autograd.grad(out, (x, norm.weight), upstream)
        want = torch.autograd.grad(ref, (x, norm.weight), upstream)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- RoPE table


def test_rope_table_is_built_once_and_sliced_for_every_length():
    table = RopeTable(head_dim=16, theta=10000.0, max_len=128)
    for length in [1, 2, 7, 64, 127, 128, 33, 5]:
        cos, sin = table.get(0, length, CPU)
        ref_cos, ref_sin = rotary_cos_sin(length, 16, 10000.0, CPU)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), length
    assert list(table.tables) == [CPU] and table.tables[CPU][0].shape == (128, 16)
    # an offset slice (the prefix cache's suffix) has the phases of the absolute positions
    cos, _ = table.get(40, 8, CPU)
    assert torch.equal(cos, rotary_cos_sin(48, 16, 10000.0, CPU)[0][40:])
    # longer than the configured maximum: the one table is rebuilt longer, not joined by another
    cos, _ = table.get(0, 200, CPU)
    assert torch.equal(cos, rotary_cos_sin(200, 16, 10000.0, CPU)[0])
    assert len(table.tables) == 1 and table.tables[CPU][0].shape == (200, 16)


def test_model_reuses_one_rope_table_across_lengths():
    model = built(small_cfg()).eval()
    with torch.no_grad():
        for length in (3, 17, 64, 9):
            model(torch.randint(0, 40, (1, length)))
    assert len(model.rope.tables) == 1 and model.rope.tables[CPU][0].shape == (64, 8)


def test_rope_table_adds_no_state_and_stays_fp32(tmp_path):
    model = built(small_cfg()).eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]
    # released-layout round trip through the meta-device build of load_pretrained
    loaded = load_pretrained(save_pretrained(model.state_dict(), model.config, tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref)
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 mode does: the table must not be rounded
    with torch.no_grad():
        model(ids)
    assert model.rope.tables[CPU][0].dtype == torch.float32


def test_rope_table_made_while_sampling_serves_training():
    model = built(small_cfg())
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(ids)
    model.train()
    model(ids).float().pow(2).mean().backward()  # an inference-mode table could not be saved
    assert model.transformer.wte.weight.grad is not None


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("masked", [False, True])
def test_native_gqa_matches_repeated_heads(masked, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k, v = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        key_mask[1, ..., :3] = False  # a left-padded row
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q_, k_, v_, **kw):
        seen.append((k_.shape[1], kw.get("enable_gqa", False)))
        return sdpa(q_, k_, v_, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = attend(q, k, v, key_mask, flash=None)
    torch.testing.assert_close(out, reference_attention(q, k, v, key_mask), rtol=1e-5, atol=1e-6)
    if layers_mod.SDPA_HAS_GQA and not masked:
        assert seen == [(2, True)]  # k, v reach the kernel at their own head count
    else:
        assert seen == [(4, False)]


def test_flash_attn_is_resolved_once_at_build(monkeypatch):
    def fake_flash(q, k, v, causal):  # never reached on CPU: SDPA serves there
        raise AssertionError("flash-attn kernel called on CPU")

    fake_module = types.SimpleNamespace(flash_attn_func=fake_flash)
    monkeypatch.setitem(sys.modules, "flash_attn", fake_module)
    model = built(small_cfg(attention_backend="flash")).eval()
    assert all(block.flash is fake_flash for block in model.transformer.blocks)
    sdpa_model = built(small_cfg()).eval()
    assert all(block.flash is None for block in sdpa_model.transformer.blocks)

    def no_lookup(*_args):
        raise AssertionError("flash-attn looked up during forward")

    monkeypatch.setattr(transformer_mod, "resolve_flash_attn", no_lookup)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import now raises ImportError
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), sdpa_model(ids))


# ---------------------------------------------------------------- compile


@pytest.mark.parametrize("policy", ["off", "save_matmuls"])
def test_compiled_blocks_match_eager_logits_and_grads(policy):
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    eager = built(small_cfg(n_layers=2)).train()
    # with checkpointing the (selective) recompute is compiled inside each block too
    ckpt = {"activation_checkpointing": True, "checkpoint_policy": policy}
    ckpt = {} if policy == "off" else ckpt
    compiled = built(small_cfg(n_layers=2, **ckpt)).train()
    names = list(compiled.state_dict())
    compiled.compile_blocks(backend="aot_eager")
    assert list(compiled.state_dict()) == names  # no _orig_mod. prefixes
    ref_logits, ref_grads = grads_of(eager, ids)
    logits, grads = grads_of(compiled, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_compiled_blocks_share_graphs_across_layers():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # more blocks than dynamo's recompile limit (8): a graph per block would fall back to eager
    cfg = small_cfg(n_layers=10, activation_checkpointing=True, checkpoint_every=3)
    model = built(cfg).train()
    model.compile_blocks(backend="aot_eager")
    model(torch.randint(0, 40, (2, 9))).float().pow(2).mean().backward()
    assert counters["stats"]["unique_graphs"] == 2  # checkpointed blocks and the others


def test_build_model_compiles_only_when_asked_and_export_is_unchanged():
    cfg = small_cfg(n_layers=2, compile=True, compile_backend="aot_eager")
    model = build_model(cfg, zero_stage=0, ds_config={}, seed=0, init_from=None)
    assert all(b._compiled_call_impl is not None for b in model.transformer.blocks)
    plain = build_model(small_cfg(n_layers=2), zero_stage=0, ds_config={}, seed=0, init_from=None)
    assert all(b._compiled_call_impl is None for b in plain.transformer.blocks)
    switches = {"compile", "compile_backend", "checkpoint_every", "checkpoint_policy"}
    assert switches <= set(RUNTIME_FIELDS)
    # runtime switches never reach the released config.json
    tuned = small_cfg(compile=True, activation_checkpointing=True, checkpoint_every=2,
                      checkpoint_policy="save_matmuls")
    assert tuned.to_llada_json() == small_cfg().to_llada_json()


def test_runtime_switches_apply_on_top_of_a_pretrained_folder(tmp_path):
    model = built(small_cfg())
    folder = save_pretrained(model.state_dict(), model.config, tmp_path / "m")
    run = ModelConfig(compile=True, compile_backend="aot_eager", activation_checkpointing=True,
                      checkpoint_every=2, checkpoint_policy="save_matmuls",
                      attention_backend="flash")
    resolved = resolve_model_config(run, str(folder))
    assert (resolved.d_model, resolved.n_kv_heads) == (32, 2)  # the folder's architecture
    assert all(getattr(resolved, k) == getattr(run, k) for k in RUNTIME_FIELDS)


# ---------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize(("policy", "every", "rerun"), [
    ("full", 1, [0, 1, 2, 3]), ("full", 2, [0, 2]), ("save_matmuls", 1, [0, 1, 2, 3]),
    ("save_matmuls", 3, [0, 3]),
])  # fmt: skip
def test_selective_checkpointing_gives_the_same_gradients(policy, every, rerun):
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    plain = built(small_cfg()).train()
    ref_logits, ref_grads = grads_of(plain, ids)
    cfg = small_cfg(activation_checkpointing=True, checkpoint_every=every, checkpoint_policy=policy)
    model = built(cfg).train()
    calls = [0] * cfg.n_layers
    def counter(i: int):
        return lambda *_args: calls.__setitem__(i, calls[i] + 1)

    for i, block in enumerate(model.transformer.blocks):
        # the block's first module: called again when the block is recomputed in backward
        block.attn_norm.register_forward_pre_hook(counter(i))
    logits, grads = grads_of(model, ids)
    # checkpointed blocks started again in backward (recompute); the others ran once
    assert [i for i, c in enumerate(calls) if c == 2] == rerun and set(calls) <= {1, 2}
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_bad_checkpoint_settings_are_rejected():
    from llada_train.errors import LladaError

    with pytest.raises(LladaError, match="checkpoint_every"):
        small_cfg(checkpoint_every=0)
    with pytest.raises(LladaError, match="checkpoint_policy"):
        small_cfg(checkpoint_policy="some")


def test_return_hidden_is_the_last_block_output_before_ln_f():
    model = built(small_cfg()).eval()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)  # (B, L, d)
        t = model.transformer
        assert hidden.shape == (2, 7, 32)
        assert torch.equal(t.ff_out(t.ln_f(hidden)), model(ids))


def test_save_matmuls_recomputes_no_matmul_in_backward():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten.mm.default
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(5))
    counts = {}
    for policy in ("off", "full", "save_matmuls"):
        on = policy != "off"
        cfg = small_cfg(activation_checkpointing=on, checkpoint_policy=policy if on else "full")
        loss = built(cfg).train()(ids).float().pow(2).mean()
        with CountMatmuls() as counter:
            loss.backward()
        counts[policy] = counter.calls
    assert counts["full"] > counts["off"]  # full recompute reruns the projections
    assert counts["save_matmuls"] == counts["off"]  # selective: their outputs were kept
