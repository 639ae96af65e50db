"""SPEC §2/§3 objectives against hand-computed numbers and sampling statistics."""

from __future__ import annotations

import math

import pytest
import torch

from llada_train.diffusion import (
    ObjectiveConfig,
    PretrainObjective,
    SFTObjective,
    mask_tokens,
    maybe_cut_length,
    sample_mask_prob,
)
from llada_train.diffusion.losses import masked_ce, pretrain_loss_from, sft_loss_from

MASK = 7


def test_pretrain_loss_weights_by_one_over_p_and_divides_by_b_times_l():
    # Uniform logits over V=4: CE = log 4 at every masked position.
    logits = torch.zeros(2, 2, 4)
    x0 = torch.tensor([[1, 2], [3, 0]])
    masked = torch.tensor([[True, False], [True, True]])
    p = torch.tensor([0.5, 0.25])
    loss = pretrain_loss_from(masked_ce(logits, x0, masked), p)
    # (log4/0.5 + log4/0.25 + log4/0.25) / (2*2) = 2.5 log 4
    assert loss.item() == pytest.approx(2.5 * math.log(4), rel=1e-6)


def test_masked_ce_matches_log_softmax_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    x0 = torch.tensor([[0]])
    ce = masked_ce(logits, x0, torch.tensor([[True]]))
    expected = -(2.0 - math.log(math.exp(2.0) + 2.0))
    assert ce.item() == pytest.approx(expected, rel=1e-6)


def test_sft_loss_normalises_per_row_by_answer_length():
    # L=4; row 0 prompt 1 -> ans_len 3; row 1 prompt 2 -> ans_len 2. Uniform logits over V=2.
    ce_masked = masked_ce(
        torch.zeros(2, 4, 2),
        torch.zeros(2, 4, dtype=torch.long),
        torch.tensor([[False, True, True, False], [False, False, True, True]]),
    )
    p = torch.tensor([0.5, 0.2])
    loss = sft_loss_from(ce_masked, p, torch.tensor([1, 2]))
    ln2 = math.log(2)
    expected = ((2 * ln2 / 0.5) / 3 + (2 * ln2 / 0.2) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


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


class _UniformModel(torch.nn.Module):
    """Returns equal logits everywhere and records what it was shown."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.seen: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen = ids.clone()
        return torch.zeros(*ids.shape, self.vocab)


def test_pretrain_objective_equals_formula_on_the_masks_it_drew():
    model = _UniformModel(16)
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=0.0), MASK)
    x0 = torch.randint(8, 16, (3, 20), generator=torch.Generator().manual_seed(0))
    out = obj(model, {"input_ids": x0}, torch.Generator().manual_seed(5))
    # replay the same draws: cut coin + length, then t, then the per-token uniforms
    g = torch.Generator().manual_seed(5)
    torch.rand((), generator=g)
    torch.randint(1, 21, (), generator=g)
    p = sample_mask_prob(3, 1e-3, g)
    masked = model.seen == MASK
    expected = sum(masked[b].sum().item() * math.log(16) / p[b].item() for b in range(3)) / 60
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.num_masked == masked.sum().item()


def test_sft_objective_never_masks_the_prompt():
    model = _UniformModel(16)
    obj = SFTObjective(ObjectiveConfig(name="sft"), MASK)
    x0 = torch.randint(8, 16, (4, 12), generator=torch.Generator().manual_seed(0))
    prompt_len = torch.tensor([3, 5, 7, 11])
    for seed in range(20):
        obj(model, {"input_ids": x0, "prompt_len": prompt_len}, torch.Generator().manual_seed(seed))
        in_prompt = torch.arange(12)[None, :] < prompt_len[:, None]
        assert not (model.seen == MASK)[in_prompt].any()


def test_sft_prompt_logits_receive_no_gradient():
    x0 = torch.randint(8, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    prompt_len = torch.tensor([2, 3])
    logits = torch.randn(2, 6, 16, requires_grad=True)
    obj = SFTObjective(ObjectiveConfig(name="sft", eps=0.999), MASK)  # p ~ 1: all response masked
    obj(lambda ids: logits, {"input_ids": x0, "prompt_len": prompt_len}, torch.Generator().manual_seed(0)).loss.backward()
    in_prompt = torch.arange(6)[None, :] < prompt_len[:, None]
    assert torch.all(logits.grad[in_prompt] == 0)
    assert torch.all(logits.grad[~in_prompt].abs().sum(-1) > 0)
