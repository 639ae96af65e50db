"""objective=block (SPEC §8) against independent references: one block is the §2/§3 objective
exactly; the 2L pass equals the block-by-block definition; block 1 fully masked is the AR twin;
complementary views; keyed masks; SFT prompts and block padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from llada_train.diffusion import ARObjective, ObjectiveConfig, PretrainObjective, SFTObjective
from llada_train.diffusion.block import BlockObjective
from llada_train.diffusion.forward import NoiseKey
from llada_train.diffusion.registry import build_objective
from llada_train.model import LLaDAModel, ModelConfig

MASK, EOS, V = 7, 3, 97


def model_of(seed: int = 0, **over) -> LLaDAModel:
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=V,
        max_sequence_length=64, mask_token_id=MASK, eos_token_id=EOS, **over,
    )
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def pretrain_batch(rows: int = 3, length: int = 16, first: int = 0, seed: int = 0) -> dict:
    ids = torch.randint(8, V, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "sample_index": torch.arange(first, first + rows)}


def sft_batch(length: int = 13) -> dict:
    ids = torch.randint(8, V, (3, length), generator=torch.Generator().manual_seed(1))
    ids[0, 10:] = EOS  # a short response right-padded with EOS, as the collator does
    return {"input_ids": ids, "prompt_len": torch.tensor([4, 7, 2]), "sample_index": torch.arange(3)}


def block_obj(**over) -> BlockObjective:
    return BlockObjective(ObjectiveConfig(name="block", **over), MASK, EOS)


def loss_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def rel_close(a: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    return (a - ref).abs().max().item() <= tol * ref.abs().max().item()


# ---- the independent definition (BD3-LM eq. 8): block by block ---------------------------
def blockwise_loss(model, x0, clean, noisy, masked, weight, block, docs=None) -> torch.Tensor:
    """sum over blocks b of the weighted CE of noisy block b, the model run block-causally on
    (clean blocks < b, noisy block b): the likelihood's own factorisation, one pass per block."""
    total = torch.zeros(())
    for s in range(0, x0.shape[1], block):
        e = s + block
        inp = torch.cat([clean[:, :s], noisy[:, s:e]], dim=1)  # (B, e)
        kw = {} if docs is None else {"document_ids": docs[:, :e]}
        logits = model(inp, block_size=block, **kw)[:, s:e].float()  # (B, block, V)
        ce = F.cross_entropy(logits.transpose(1, 2), x0[:, s:e], reduction="none")
        total = total + (ce * weight[:, s:e] * masked[:, s:e]).sum()
    return total


def keyed_p(key: NoiseKey, index: torch.Tensor, blocks: int, length: int, eps: float = 1e-3):
    """p per token written out from the key (per-block t, no strata): (B, L)."""
    t = key.t_uniforms(index, blocks)
    return ((1 - eps) * t + eps).repeat_interleave(length // blocks, dim=1)


# ---- (a) one block is the full-diffusion objective, exactly --------------------------------
@pytest.mark.parametrize("block_size", [0, 16, 32])
@pytest.mark.parametrize("t_per", ["block", "sequence"])
@pytest.mark.parametrize("var_len_prob", [0.0, 1.0])  # 1.0: every step cut to U{1..L}
def test_one_block_is_the_pretrain_objective_exactly(block_size, t_per, var_len_prob):
    model, batch = model_of(), pretrain_batch()
    batch["document_ids"] = torch.tensor([[0] * 9 + [1] * 7] * 3)
    key = NoiseKey(seed=3, step=11)
    ref = PretrainObjective(ObjectiveConfig(var_len_prob=var_len_prob, loss_chunk_rows=5), MASK)
    obj = block_obj(block_size=block_size, t_per=t_per, var_len_prob=var_len_prob, loss_chunk_rows=5)
    want, want_g = loss_and_grads(model, lambda: ref(model, batch, key).loss)
    got, got_g = loss_and_grads(model, lambda: obj(model, batch, key).loss)
    assert torch.equal(got, want)
    assert all(torch.equal(got_g[n], want_g[n]) for n in want_g)


@pytest.mark.parametrize("p_uncond", [0.0, 0.5])
def test_one_block_is_the_sft_objective_exactly(p_uncond):
    model, batch, key = model_of(), sft_batch(), NoiseKey(seed=1, step=2)
    ref = SFTObjective(ObjectiveConfig(name="sft", p_uncond=p_uncond), MASK)
    obj = block_obj(block_size=0, p_uncond=p_uncond)
    assert torch.equal(obj(model, batch, key).loss, ref(model, batch, key).loss)
    assert torch.equal(obj(model, batch, torch.Generator().manual_seed(5)).loss,
                       ref(model, batch, torch.Generator().manual_seed(5)).loss)  # stream draws too


def test_generator_stream_one_block_matches_pretrain():
    model, batch = model_of(), pretrain_batch()
    ref = PretrainObjective(ObjectiveConfig(var_len_prob=0.5), MASK)
    obj = block_obj(block_size=0, var_len_prob=0.5)
    for seed in range(4):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(obj(model, batch, g1).loss, ref(model, batch, g2).loss)
        assert torch.equal(g1.get_state(), g2.get_state())


# ---- (b) the 2L pass equals the block-by-block definition: proves the mask ---------------
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("docs", [False, True])
def test_paired_pass_equals_block_by_block_definition(shift, docs):
    model = model_of(shift_logits=shift)
    batch, key, block = pretrain_batch(length=16), NoiseKey(seed=0, step=4), 4
    if docs:
        batch["document_ids"] = torch.tensor([[0] * 6 + [1] * 10, [0] * 16, [0] * 3 + [1] * 8 + [2] * 5])
    obj = block_obj(block_size=block, antithetic=False, var_len_prob=0.0, loss_chunk_rows=7)
    d = obj.draw(batch, key)
    (noisy, masked, weight), = d.views
    # the draws, written out from the key: t per block, p = (1 - eps) t + eps, u < p, 1 / (p B L)
    p = keyed_p(key, batch["sample_index"], 4, 16)
    assert torch.equal(masked, key.token_uniforms(batch["sample_index"], 16) < p)
    assert torch.allclose(weight, 1.0 / (p * 48), rtol=1e-6, atol=0)
    ref, ref_g = loss_and_grads(model, lambda: blockwise_loss(
        model, d.x0, d.x0, noisy, masked, 1.0 / (p * 48), block, batch.get("document_ids")))
    got, got_g = loss_and_grads(model, lambda: obj(model, batch, key).loss)
    assert masked.any(dim=0).sum() > 4 and rel_close(got, ref), (got, ref)
    for n in ref_g:
        assert rel_close(got_g[n], ref_g[n], 2e-5), n


def test_antithetic_strata_cover_each_stratum_once_per_row():
    obj = block_obj(block_size=2, var_len_prob=0.0, eps=0.0)
    batch, key = pretrain_batch(rows=5, length=16), NoiseKey(seed=2, step=0)
    _, masked, weight = obj.draw(batch, key).views[0]
    p = 1.0 / (weight[:, ::2] * (5 * 16))  # (B, 8): one t per block (eps = 0: p = t)
    strata = torch.sort((p * 8).floor(), dim=1).values
    assert torch.equal(strata, torch.arange(8.0).expand(5, 8))  # each row covers [0,1) once
    assert not torch.equal(p[0].argsort(), p[1].argsort())  # in a keyed random order


# ---- (c) complementary views: every target token learned exactly once ----------------------
@pytest.mark.parametrize("sft", [False, True])
def test_complementary_views_cover_every_target_once(sft):
    batch = sft_batch() if sft else pretrain_batch()
    obj = block_obj(block_size=4, complementary=True, var_len_prob=0.0)
    d = obj.draw(batch, NoiseKey(seed=0, step=1))
    (n1, m1, w1), (n2, m2, w2) = d.views
    L = d.x0.shape[1]
    target = torch.arange(L)[None, :] >= batch["prompt_len"][:, None] if sft else torch.ones_like(m1)
    assert torch.equal(m1 ^ m2, target) and not (m1 & m2).any()
    assert torch.equal(n1 == MASK, m1) and torch.equal(n2 == MASK, m2)
    assert (w1 > 0).all() and (w2 > 0).all()
    model = model_of()
    loss = obj(model, batch, NoiseKey(seed=0, step=1)).loss
    halves = [blockwise_loss(model, d.x0, d.clean, n, m, w, 4) for n, m, w in d.views]
    assert rel_close(loss, (halves[0] + halves[1]) / 2)


# ---- (d) keyed masks: micro-batch splits and the curriculum's block size --------------------
def test_keyed_masks_give_the_same_loss_on_micro_batches():
    model, key = model_of(), NoiseKey(seed=7, step=3)
    whole = pretrain_batch(rows=4)
    halves = [{k: v[i:i + 2] for k, v in whole.items()} for i in (0, 2)]
    obj = block_obj(block_size=4, var_len_prob=0.3, complementary=True)
    full = obj(model, whole, key).loss
    split = sum(obj(model, h, key).loss for h in halves) / 2
    assert rel_close(split, full)
    masks = [obj.draw(h, key).views[0][1] for h in halves]
    assert torch.equal(torch.cat(masks), obj.draw(whole, key).views[0][1])


def test_curriculum_block_size_comes_with_the_noise_key():
    obj, batch = block_obj(block_size=8, var_len_prob=0.0), pretrain_batch()
    assert obj.draw(batch, NoiseKey(0, 0)).block == 8
    assert obj.draw(batch, NoiseKey(0, 0, block_size=4)).block == 4
    assert obj.draw(batch, NoiseKey(0, 0, block_size=0)).block == 0  # the whole sequence: 1L


# ---- (e) block size 1, every token masked: the autoregressive twin ------------------------
def test_block_one_fully_masked_is_the_causal_lm_with_a_mask_input():
    """Unshifted: position i reads MASK and the clean tokens < i, i.e. the causal twin run on
    (x_<i, MASK); its loss is the AR factorisation sum_i -log p(x_i | x_<i) / (B L)."""
    model, batch = model_of(), pretrain_batch(rows=2, length=8)
    obj = block_obj(block_size=1, mask_ratio_min=1.0, mask_ratio_max=1.0, var_len_prob=0.0)
    twin = model_of(causal=True)  # the same weights (same seed), causal attention
    x = batch["input_ids"]
    total = torch.zeros(())
    for i in range(8):
        inp = torch.cat([x[:, :i], torch.full((2, 1), MASK)], dim=1)
        total = total + F.cross_entropy(twin(inp)[:, i].float(), x[:, i], reduction="sum")
    assert rel_close(obj(model, batch, NoiseKey(0, 0)).loss, total / 16)


def test_block_one_fully_masked_on_a_shifted_model_is_the_ar_objective():
    """Shifted (AR-initialised, Fast-dLLM v2): token i > 0 is predicted from the clean row
    i-1, exactly the causal twin's next-token prediction; token 0 from a lone MASK."""
    model, batch = model_of(shift_logits=True), pretrain_batch(rows=2, length=8)
    obj = block_obj(block_size=1, mask_ratio_min=1.0, mask_ratio_max=1.0, var_len_prob=0.0)
    twin = model_of(causal=True, shift_logits=True)
    ar = ARObjective(ObjectiveConfig(name="ar"))(twin, batch).loss  # mean over tokens 1..7
    x = batch["input_ids"]
    first = F.cross_entropy(model(torch.full((2, 1), MASK))[:, 0].float(), x[:, 0], reduction="sum")
    got = obj(model, batch, NoiseKey(0, 0)).loss * 16
    assert rel_close(got, first + ar * 14)


# ---- (f) SFT: prompts never masked, rows padded with EOS to a block multiple ----------------
def test_sft_pads_to_a_block_multiple_and_never_masks_the_prompt():
    batch, model = sft_batch(length=13), model_of()
    obj = block_obj(block_size=4, p_uncond=0.3)
    seen_pad_masked = False
    for step in range(6):
        d = obj.draw(batch, NoiseKey(0, step))
        assert d.x0.shape == (3, 16) and (d.x0[:, 13:] == EOS).all()  # padded to 16 with EOS
        prompt = torch.arange(16)[None, :] < batch["prompt_len"][:, None]
        (noisy, masked, weight), = d.views
        assert not (masked & prompt).any()
        seen_pad_masked |= bool(masked[:, 13:].any())
        # prompt dropped (CFG): MASK in both halves' inputs, never a target
        dropped = (d.clean == MASK) & prompt
        assert torch.equal(dropped, (noisy == MASK) & prompt)
    assert seen_pad_masked  # the EOS padding is response: masked and trained on
    d = obj.draw(batch, NoiseKey(0, 0))
    (noisy, masked, weight), = d.views
    ans = (16 - batch["prompt_len"]).float()[:, None]
    p = 1.0 / (weight * ans * 3)  # the SPEC §3 normaliser with the padded length
    assert (p <= 1 + 1e-6).all() and (p >= 1e-3 - 1e-6).all()
    got = obj(model, batch, NoiseKey(0, 0)).loss
    assert rel_close(got, blockwise_loss(model, d.x0, d.clean, noisy, masked, weight, 4))


def test_uniform_weight_and_band():
    batch, key = pretrain_batch(), NoiseKey(0, 9)
    d = block_obj(block_size=4, weight="uniform", var_len_prob=0.0).draw(batch, key)
    assert torch.all(d.views[0][2] == 1.0 / 48)
    obj = block_obj(block_size=4, mask_ratio_min=0.3, mask_ratio_max=0.8, var_len_prob=0.0)
    w = obj.draw(batch, key).views[0][2]
    p = 1.0 / (w * 48)
    assert p.min() >= 0.3 * 0.999 + 1e-3 - 1e-6 and p.max() <= 0.8 * 0.999 + 1e-3 + 1e-6


def test_registry_builds_block_from_its_yaml():
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    raw = OmegaConf.load(REPO / "conf" / "objective" / "block.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ObjectiveConfig), raw))
    obj = build_objective(cfg, MASK, EOS)
    assert isinstance(obj, BlockObjective) and obj.cfg.block_size == 32
    cfg = dataclasses.replace(cfg, block_size=4, var_len_prob=0.0)
    model = model_of()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):  # the same batch and noise: the loss must fall
        loss = build_objective(cfg, MASK, EOS)(model, pretrain_batch(), NoiseKey(0, 0)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_mask_embedding_noise_only_for_the_first_steps_and_keyed():
    model, batch = model_of(), pretrain_batch(rows=4)
    plain = block_obj(block_size=4, var_len_prob=0.0)
    noisy = block_obj(block_size=4, var_len_prob=0.0, mask_embed_noise_std=0.5, mask_embed_noise_steps=3)
    for step in (0, 2):  # inside the window: the MASK embeddings are perturbed
        assert not torch.equal(noisy(model, batch, NoiseKey(0, step)).loss,
                               plain(model, batch, NoiseKey(0, step)).loss)
    assert torch.equal(noisy(model, batch, NoiseKey(0, 3)).loss, plain(model, batch, NoiseKey(0, 3)).loss)
    halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
    split = sum(noisy(model, h, NoiseKey(0, 1)).loss for h in halves) / 2
    assert rel_close(split, noisy(model, batch, NoiseKey(0, 1)).loss)  # keyed per sample
    assert not model.transformer.wte._forward_hooks  # the hook is removed after the pass


def test_objective_modules_import_no_circle_and_never_the_registry():
    """diffusion/registry.py names objectives as strings; no objective imports it back, and the
    package's imports form no cycle (losses.py <-> ar.py did)."""
    import ast
    from pathlib import Path

    from llada_train.diffusion import OBJECTIVES

    def imported(f: Path) -> set[str]:
        tree = ast.parse(f.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    root = Path(__file__).resolve().parents[1]
    pkg = root / "llada_train" / "diffusion"
    deps = {}
    for f in pkg.glob("*.py"):
        mods = imported(f)
        deps[f.stem] = {m.rsplit(".", 1)[1] for m in mods if m.startswith("llada_train.diffusion.")}
    for target in OBJECTIVES.values():  # an objective may live outside the package (rl/)
        module = target.split(":")[0]
        assert "llada_train.diffusion.registry" not in imported(root / (module.replace(".", "/") + ".py")), target

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        for nxt in deps.get(node, ()):
            visit(nxt, (*path, node))

    for module in deps:
        visit(module, ())
