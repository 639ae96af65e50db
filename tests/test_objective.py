"""SPEC §2/§3 objectives: hand-computed numbers, sampling statistics, and parity of the
masked-row chunked loss with the full-logits formula it replaced (written out here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llada_train.data.pretrain import document_ids
from llada_train.diffusion import (
    ObjectiveConfig,
    PretrainObjective,
    SFTObjective,
    mask_tokens,
    maybe_cut_length,
    sample_mask_prob,
)
from llada_train.diffusion.chunked_ce import WeightedCE, chunked_head_ce
from llada_train.diffusion.forward import NoiseKey
from llada_train.diffusion.losses import masked_head_loss
from llada_train.model import LLaDAModel, ModelConfig

MASK = 7


# ---- the full-logits path as it was before the masked-row loss (the reference) -----------
def old_pretrain_loss(model, batch, generator, cfg: ObjectiveConfig) -> torch.Tensor:
    x0 = maybe_cut_length(batch["input_ids"], cfg.var_len_prob, generator)
    B, L = x0.shape
    p = sample_mask_prob(B, cfg.eps, generator)
    noisy, masked = mask_tokens(x0, p, MASK, generator)
    logits = model(noisy)  # (B, L, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none") * masked
    return (ce / p[:, None]).sum() / (B * L)


def old_sft_loss(model, batch, generator, cfg: ObjectiveConfig) -> torch.Tensor:
    x0, prompt_len = batch["input_ids"], batch["prompt_len"]
    B, L = x0.shape
    is_prompt = torch.arange(L)[None, :] < prompt_len[:, None]
    p = sample_mask_prob(B, cfg.eps, generator)
    noisy, masked = mask_tokens(x0, p, MASK, generator, maskable=~is_prompt)
    if cfg.p_uncond > 0:
        drop = torch.rand(B, generator=generator) < cfg.p_uncond
        noisy = torch.where(is_prompt & drop[:, None], torch.full_like(noisy, MASK), noisy)
    logits = model(noisy)  # (B, L, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none") * masked
    ans_len = (L - prompt_len).clamp(min=1).to(torch.float32)
    return (ce / p[:, None] / ans_len[:, None]).sum() / B


def tiny_model(seed: int = 0) -> LLaDAModel:
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=97,
        max_sequence_length=64, mask_token_id=MASK,
    )
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def loss_and_grads(model: nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    """Run ``fn()`` -> loss, backpropagate; (loss, grads by name, model inputs seen)."""
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, seen


def assert_rel_close(a: torch.Tensor, ref: torch.Tensor, what: str = "", tol: float = 1e-5) -> None:
    """max |a - ref| <= tol * max |ref| (exact equality when ref is all zeros)."""
    err = (a - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} vs scale {scale:.3e}"


def check_parity(objective, old_fn, batch, seed: int, min_head_calls: int = 2):
    """New objective vs the old formula on the same draws: loss, every grad, masks, stream."""
    model = tiny_model()
    g_old, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ref_loss, ref_grads, ref_seen = loss_and_grads(model, lambda: old_fn(model, batch, g_old, objective.cfg))
    calls = []
    hook = model.transformer.ff_out.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    out = None

    def run():
        nonlocal out
        out = objective(model, batch, g_new)
        calls.append("backward")
        return out.loss

    loss, grads, seen = loss_and_grads(model, run)
    hook.remove()
    # same random stream: same model input, and the generator ends in the same state
    assert len(seen) == len(ref_seen) == 1 and torch.equal(seen[0], ref_seen[0])
    assert torch.equal(g_old.get_state(), g_new.get_state())
    assert out.num_tokens == seen[0].numel()
    assert isinstance(out.num_masked, torch.Tensor) and out.num_masked.dim() == 0
    forward_calls = calls[: calls.index("backward")]
    assert len(forward_calls) >= min_head_calls, forward_calls  # several chunks really ran
    assert_rel_close(loss, ref_loss)
    for name, ref in ref_grads.items():
        assert_rel_close(grads[name], ref, what=name)
    return out, seen[0], ref_loss


def test_pretrain_parity_several_chunks():
    x0 = torch.randint(8, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=0.0, loss_chunk_rows=5), MASK)
    out, seen, ref_loss = check_parity(obj, old_pretrain_loss, {"input_ids": x0}, seed=3)
    assert out.num_masked.item() == (seen == MASK).sum().item() > 10
    assert ref_loss.item() > 0


def test_pretrain_parity_one_chunk_without_recompute():
    x0 = torch.randint(8, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=0.0, loss_chunk_rows=0), MASK)
    check_parity(obj, old_pretrain_loss, {"input_ids": x0}, seed=4, min_head_calls=1)


def test_pretrain_parity_with_the_length_cut():
    x0 = torch.randint(8, 97, (3, 40), generator=torch.Generator().manual_seed(2))
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=1.0, loss_chunk_rows=4), MASK)
    _, seen, _ = check_parity(obj, old_pretrain_loss, {"input_ids": x0}, seed=13)
    assert 1 < seen.shape[1] < 40  # the cut happened (seed chosen so it is not a no-op)


@pytest.mark.parametrize("p_uncond", [0.0, 0.5, 1.0])
def test_sft_parity_with_cfg_dropout(p_uncond):
    x0 = torch.randint(8, 97, (4, 20), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": x0, "prompt_len": torch.tensor([3, 9, 15, 19])}
    obj = SFTObjective(ObjectiveConfig(name="sft", p_uncond=p_uncond, loss_chunk_rows=3), MASK)
    _, seen, _ = check_parity(obj, old_sft_loss, batch, seed=5)
    in_prompt = torch.arange(20)[None, :] < batch["prompt_len"][:, None]
    dropped = (seen == MASK)[in_prompt]
    if p_uncond == 1.0:
        assert dropped.all()
    if p_uncond == 0.0:
        assert not dropped.any()


def test_zero_masked_rows_gives_zero_loss_and_zero_grads():
    x0 = torch.randint(8, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": x0, "prompt_len": torch.tensor([10, 10])}  # nothing maskable
    obj = SFTObjective(ObjectiveConfig(name="sft", loss_chunk_rows=4), MASK)
    out, _, ref_loss = check_parity(obj, old_sft_loss, batch, seed=6, min_head_calls=1)
    assert out.loss.item() == ref_loss.item() == 0.0
    assert out.num_masked.item() == 0


def test_engine_wrapper_head_is_found_on_module():
    """A DeepSpeed engine forwards calls to ``.module``; the head lives there."""

    class Engine(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = tiny_model()
    x0 = torch.randint(8, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=0.0, loss_chunk_rows=4), MASK)
    new = obj(Engine(model), {"input_ids": x0}, torch.Generator().manual_seed(0)).loss
    ref = old_pretrain_loss(model, {"input_ids": x0}, torch.Generator().manual_seed(0), obj.cfg)
    assert_rel_close(new.detach(), ref.detach())


def test_chunked_head_ce_matches_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(11, 6, generator=g, requires_grad=True)
    head = nn.Linear(6, 13, bias=False)
    tgt = torch.randint(0, 13, (11,), generator=g)
    w = torch.rand(11, generator=g)
    got = chunked_head_ce(rows, head, tgt, w, chunk_rows=4)
    (g_rows,) = torch.autograd.grad(got, rows)
    ref = (F.cross_entropy(head(rows), tgt, reduction="none") * w).sum()
    (r_rows,) = torch.autograd.grad(ref, rows)
    assert_rel_close(got.detach(), ref.detach())
    assert_rel_close(g_rows, r_rows)


def test_weighted_ce_on_bf16_logits_is_fp32_math_with_bf16_grads():
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(9, 50, generator=g)).to(torch.bfloat16).requires_grad_()
    tgt = torch.randint(0, 50, (9,), generator=g)
    w = torch.rand(9, generator=g)
    WeightedCE.apply(logits, tgt, w).backward(torch.tensor(2.0))
    ref_in = logits.detach().float().requires_grad_()  # the same bf16 values, fp32 math
    ref = (F.cross_entropy(ref_in, tgt, reduction="none") * w).sum()
    (2 * ref).backward()
    got = WeightedCE.apply(logits.detach(), tgt, w)
    assert_rel_close(got, ref.detach())
    assert logits.grad.dtype == torch.bfloat16
    assert_rel_close(logits.grad.float(), ref_in.grad, tol=1e-2)  # bf16 rounding of the grad


def test_loss_chunk_rows_must_not_be_negative():
    with pytest.raises(Exception, match="loss_chunk_rows"):
        ObjectiveConfig(loss_chunk_rows=-1)


# ---- hand-computed numbers on a stub whose head gives uniform logits ----------------------
class _StubModel(nn.Module):
    """Hidden states are a leaf parameter; ln_f is the identity, the head gives zeros."""

    def __init__(self, batch: int, length: int, vocab: int, d: int = 4) -> None:
        super().__init__()
        self.hidden = nn.Parameter(torch.randn(batch, length, d))
        self.transformer = nn.ModuleDict({"ln_f": nn.Identity(), "ff_out": nn.Linear(d, vocab, bias=False)})
        nn.init.zeros_(self.transformer.ff_out.weight)
        self.seen: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor, *, return_hidden: bool = False) -> torch.Tensor:
        assert return_hidden
        self.seen = ids.clone()
        return self.hidden[:, : ids.shape[1]]


def test_pretrain_objective_equals_formula_on_the_masks_it_drew():
    model = _StubModel(3, 20, 16)
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=0.0, loss_chunk_rows=7), MASK)
    x0 = torch.randint(8, 16, (3, 20), generator=torch.Generator().manual_seed(0))
    out = obj(model, {"input_ids": x0}, torch.Generator().manual_seed(5))
    # replay the same draws: cut coin + length, then t, then the per-token uniforms
    g = torch.Generator().manual_seed(5)
    torch.rand((), generator=g)
    torch.randint(1, 21, (), generator=g)
    p = sample_mask_prob(3, 1e-3, g)
    masked = model.seen == MASK
    # uniform logits over V=16: CE = log 16 at each masked position, / p, / (B L)
    expected = sum(masked[b].sum().item() * math.log(16) / p[b].item() for b in range(3)) / 60
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.num_masked.item() == masked.sum().item()


def test_sft_objective_is_formula_per_answer_length():
    model = _StubModel(2, 4, 2)
    obj = SFTObjective(ObjectiveConfig(name="sft", loss_chunk_rows=2), MASK)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "prompt_len": torch.tensor([1, 2])}
    out = obj(model, batch, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    p = sample_mask_prob(2, 1e-3, g)
    masked = model.seen == MASK
    ln2 = math.log(2)  # uniform logits over V=2; ans_len 3 and 2
    expected = (masked[0].sum().item() * ln2 / p[0].item() / 3 + masked[1].sum().item() * ln2 / p[1].item() / 2) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_sft_objective_never_masks_the_prompt():
    model = _StubModel(4, 12, 16)
    obj = SFTObjective(ObjectiveConfig(name="sft"), MASK)
    x0 = torch.randint(8, 16, (4, 12), generator=torch.Generator().manual_seed(0))
    prompt_len = torch.tensor([3, 5, 7, 11])
    for seed in range(20):
        obj(model, {"input_ids": x0, "prompt_len": prompt_len}, torch.Generator().manual_seed(seed))
        in_prompt = torch.arange(12)[None, :] < prompt_len[:, None]
        assert not (model.seen == MASK)[in_prompt].any()


def test_sft_prompt_positions_receive_no_gradient():
    model = _StubModel(2, 6, 16)
    nn.init.normal_(model.transformer.ff_out.weight)  # non-uniform logits: non-zero grads
    x0 = torch.randint(8, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    prompt_len = torch.tensor([2, 3])
    obj = SFTObjective(ObjectiveConfig(name="sft", eps=0.999, loss_chunk_rows=3), MASK)  # p ~ 1
    obj(model, {"input_ids": x0, "prompt_len": prompt_len}, torch.Generator().manual_seed(0)).loss.backward()
    in_prompt = torch.arange(6)[None, :] < prompt_len[:, None]
    assert torch.all(model.hidden.grad[in_prompt] == 0)
    assert torch.all(model.hidden.grad[~in_prompt].abs().sum(-1) > 0)


# ---- the forward process ---------------------------------------------------------------
def test_mask_prob_is_affine_in_uniform_t():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    p = sample_mask_prob(1000, 1e-3, g1)
    t = torch.rand(1000, generator=g2)
    assert torch.allclose(p, (1 - 1e-3) * t + 1e-3)
    assert p.min() >= 1e-3 and p.max() <= 1.0


def test_masking_rate_matches_p_per_row_and_mask_id_only_where_masked():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (4, 8192), generator=g)  # ids below MASK: none is MASK already
    p = torch.tensor([0.1, 0.3, 0.6, 0.9])
    noisy, masked = mask_tokens(x0, p, MASK, g)
    rates = masked.float().mean(dim=1)
    # binomial std <= sqrt(.25/8192) = 0.0055: 4 sigma
    assert torch.allclose(rates, p, atol=0.022)
    assert torch.equal(noisy == MASK, masked)
    assert torch.equal(noisy[~masked], x0[~masked])


def test_maskable_positions_are_never_masked():
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(3, 10, dtype=torch.long)
    maskable = torch.arange(10)[None, :] >= torch.tensor([[2], [5], [9]])
    _, masked = mask_tokens(x0, torch.ones(3), MASK, g, maskable=maskable)
    assert torch.equal(masked, maskable)  # p = 1 masks every maskable position, nothing else


def test_variable_length_cut_happens_about_one_percent_of_the_time():
    g = torch.Generator().manual_seed(1234)
    x = torch.zeros(1, 50, dtype=torch.long)
    lengths = [maybe_cut_length(x, 0.01, g).shape[1] for _ in range(20000)]
    cut = [n for n in lengths if n != 50]
    # expected 200 cuts (minus the 1/50 that draw L itself), std ~14
    assert 140 <= len(cut) <= 260
    assert min(cut) >= 1 and max(cut) <= 49
    assert 15 < sum(cut) / len(cut) < 35  # U{1..49} has mean 25


# ---- document-masked packing: the objective hands document_ids to the model ------------
V_D, MASK_D, EOS_D = 40, 2, 1


def test_packed_window_loss_is_the_sum_of_its_documents_losses():
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                      vocab_size=V_D, mask_token_id=MASK_D, eos_token_id=EOS_D)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.randint(3, V_D, (n - 1,), generator=gen), torch.tensor([EOS_D])])
            for n in (5, 3, 7)]
    packed = torch.cat(docs)[None]  # (1, 15)
    batch = {"input_ids": packed, "sample_index": torch.tensor([4]),
             "document_ids": document_ids(packed, EOS_D)}
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=0.0, loss_chunk_rows=4), MASK_D)
    key = NoiseKey(seed=0, step=9)
    x0, noisy, masked, w = obj.draw(batch, key)
    with torch.no_grad():
        loss = obj(model, batch, key).loss
        start, parts = 0, []
        for d in docs:  # each document alone, with the packed run's masks and weight
            sl = slice(start, start + len(d))
            parts.append(masked_head_loss(model, noisy[:, sl], x0[:, sl], masked[:, sl], w, 4))
            start += len(d)
        leaky = masked_head_loss(model, noisy, x0, masked, w, 4)  # no document mask
    assert masked.any()
    torch.testing.assert_close(loss, sum(parts), rtol=1e-5, atol=1e-6)
    assert abs(float(leaky) - float(loss)) > 1e-4  # the documents would otherwise see each other
