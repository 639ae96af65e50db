"""ESPO's loss on hand-computed numbers: group advantages, the clipped sequence-level ratio, the
k2 KL, their gradients; draws shared by the old, reference and current ELBOs; one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from llada_train.diffusion.espo import (
    ESPOConfig,
    espo_loss,
    group_advantages,
    shared_elbo_draws,
)
from llada_train.diffusion.vrpo import response_elbos
from llada_train.errors import LladaError
from llada_train.model import LLaDAModel
from llada_train.model.config import ModelConfig


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # two groups of 4
    mean = group_advantages(rewards, ESPOConfig(group_size=4))
    assert mean.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], abs=1e-7)
    # leave-one-out: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - (1 + 0 + 1) / 3 = -2/3
    loo = group_advantages(rewards, ESPOConfig(group_size=4, baseline="leave_one_out"))
    assert loo.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], abs=1e-6)
    scaled = group_advantages(rewards, ESPOConfig(group_size=4, scale_by_std=True))
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [sign * 0.5 / (std + 1e-4) for sign in (1, -1, -1, 1)]
    assert scaled[:4].tolist() == pytest.approx(expected, abs=1e-5)
    assert scaled[4:].tolist() == pytest.approx([0.0] * 4, abs=1e-7)  # a flat group: 0 / 1e-4


def test_loss_clips_where_it_binds_and_adds_the_k2_kl():
    """Two completions of one prompt, rewards 1 and 0 (advantages +0.5, -0.5), L = 10:
    rho = 1.5 and 0.5, both outside [0.8, 1.2] on the side where the clip binds."""
    L, old = 10.0, torch.tensor([-20.0, -20.0])
    policy = (old + L * torch.tensor([math.log(1.5), math.log(0.5)])).requires_grad_()
    ref = torch.tensor([-21.0, -18.0])
    cfg = ESPOConfig(group_size=2, beta=1e-3)
    out = espo_loss(policy, old, ref, torch.tensor([1.0, 0.0]), torch.tensor([L, L]), cfg)
    surrogate = -(min(1.5 * 0.5, 1.2 * 0.5) + min(0.5 * -0.5, 0.8 * -0.5)) / 2  # -(0.6 - 0.4) / 2
    d = [-20 + L * math.log(1.5) + 21, -20 + L * math.log(0.5) + 18]  # B_theta - B_ref
    kl = (d[0] ** 2 / (2 * L) + d[1] ** 2 / (2 * L)) / 2
    assert out.loss.item() == pytest.approx(surrogate + 1e-3 * kl, abs=1e-5)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["espo/kl"] == pytest.approx(kl, rel=1e-5)
    assert (m["espo/clip_low_fraction"], m["espo/clip_high_fraction"]) == (0.5, 0.5)
    assert m["espo/clip_fraction"] == 1.0 and m["espo/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert (m["espo/reward_mean"], m["espo/zero_std_groups"]) == (0.5, 0.0)
    out.loss.backward()  # both ratios clipped: only the KL's gradient d_i / (N L) is left
    assert policy.grad.tolist() == pytest.approx([1e-3 * x / (2 * L) for x in d], rel=1e-4)


def test_unclipped_gradient_and_the_first_inner_iteration():
    """rho inside the band: d loss / d B_i = -A_i rho_i / (N L_i) + beta d_i / (N L_i)."""
    lengths = torch.tensor([4.0, 8.0])
    old = torch.tensor([-10.0, -12.0])
    policy = (old + lengths * torch.tensor([math.log(1.1), math.log(0.9)])).requires_grad_()
    ref = torch.tensor([-10.0, -12.0])
    cfg = ESPOConfig(group_size=2, beta=0.5)
    out = espo_loss(policy, old, ref, torch.tensor([2.0, 0.0]), lengths, cfg)  # A = +1, -1
    out.loss.backward()
    d = (policy.detach() - ref).tolist()
    expected = [
        (-1 * 1.1 + 0.5 * d[0]) / (2 * 4.0),
        (1 * 0.9 + 0.5 * d[1]) / (2 * 8.0),
    ]
    assert policy.grad.tolist() == pytest.approx(expected, rel=1e-4)
    assert out.metrics["espo/clip_fraction"].item() == 0.0
    # one inner iteration (old = B_theta detached): rho = 1, and at the reference the loss is
    # -mean(A) = 0 with the gradient -A_i / (N L_i)
    at_ref = ref.clone().requires_grad_()
    first = espo_loss(at_ref, None, ref, torch.tensor([2.0, 0.0]), lengths, cfg)
    assert first.loss.item() == pytest.approx(0.0, abs=1e-7)
    first.loss.backward()
    assert at_ref.grad.tolist() == pytest.approx([-1 / (2 * 4.0), 1 / (2 * 8.0)], rel=1e-5)


def test_old_reference_and_current_elbos_share_their_draws():
    """The same model scored three times with one iteration's draws gives rho = 1 and KL = 0;
    the next iteration draws other masks, and the draws are keyed by completion."""
    cfg = ModelConfig(
        d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=32, vocab_size=24,
        max_sequence_length=32,
    )  # fmt: skip
    model = LLaDAModel(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    x0 = torch.randint(3, 24, (4, 20), generator=torch.Generator().manual_seed(1))  # (N, L)
    prompt_len = torch.full((4,), 5)
    index = torch.arange(100, 104)
    draws = shared_elbo_draws(0, 7, 0, index, 20, samples=4)
    with torch.no_grad():
        old = response_elbos(model, x0, prompt_len, draws, 2, 0)[0]
        ref = response_elbos(model, x0, prompt_len, draws, 2, 0)[0]
    current = response_elbos(model, x0, prompt_len, draws, 2, 0)[0]
    out = espo_loss(current, old, ref, torch.tensor([1.0, 0, 0, 1]), torch.full((4,), 15.0),
                    ESPOConfig(group_size=2))  # fmt: skip
    assert out.metrics["espo/ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert out.metrics["espo/kl"].item() == pytest.approx(0.0, abs=1e-8)
    again = shared_elbo_draws(0, 7, 0, index[2:], 20, samples=4)  # a completion's own draws
    assert torch.equal(again.u, draws.u[2:]) and torch.equal(again.p, draws.p[2:])
    other = shared_elbo_draws(0, 7, 1, index, 20, samples=4)
    assert not torch.equal(other.u, draws.u)
    with torch.no_grad():
        other_old = response_elbos(model, x0, prompt_len, other, 2, 0)[0]
    assert not torch.allclose(other_old, old, rtol=1e-3)  # unshared draws: rho != 1


def two_completions(ref_elbo, lengths):
    """ESPO's loss on one group of two completions at the default beta."""
    cfg = ESPOConfig(group_size=2)
    return espo_loss(torch.zeros(2), None, ref_elbo, torch.ones(2), lengths, cfg)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ESPOConfig(group_size=1), "espo group_size=1: use >= 2"),
        (lambda: ESPOConfig(clip_eps_low=0.0), "espo clip_eps_low=0.0; use 0 < eps < 1"),
        (lambda: ESPOConfig(baseline="median"), "espo baseline='median'; use one of group_mean"),
        (
            lambda: group_advantages(torch.ones(5), ESPOConfig(group_size=2)),
            r"espo: \(5,\) rewards are not a whole number of groups of group_size=2",
        ),
        (
            lambda: two_completions(None, torch.ones(2)),
            "espo beta=0.001 needs the reference ELBOs",
        ),
        (
            lambda: two_completions(torch.zeros(3), torch.ones(2)),
            r"espo: ref_elbo has shape \(3,\), not \(2,\)",
        ),
        (
            lambda: two_completions(torch.zeros(2), torch.tensor([3.0, 0.0])),
            "every completion length must be > 0",
        ),
    ],
)
def test_bad_input_is_one_line(build, message):
    with pytest.raises(LladaError, match=message) as info:
        build()
    assert "\n" not in str(info.value)
