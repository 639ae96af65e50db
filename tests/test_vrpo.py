"""VRPO's properties (LLaDA 1.5): log 2 at the reference, the variance ordering of the budget
allocations, shared reference noise against independent noise, keyed draws, one-line errors.

The variances are measured on a one-layer model trained for 150 steps on responses that repeat
one token (so what the policy predicts depends on how much of the response is masked); the
policy is that model with its attention queries scaled, the reference the model itself. One
pair under many pair indices gives that many independent draws in one forward per model.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from llada_train.diffusion.forward import NoiseKey
from llada_train.diffusion.losses import SFTObjective
from llada_train.diffusion.objective_base import ObjectiveConfig
from llada_train.diffusion.registry import build_objective, prepare_run
from llada_train.diffusion.vrpo import (
    PreferenceScores,
    VRPOObjective,
    elbo_draws,
    preference_metrics,
)
from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, save_pretrained
from llada_train.model.checkpoint import load_pretrained
from llada_train.model.config import ModelConfig
from llada_train.train.guard import StepSums

# a long response: the ELBO's spread over timesteps (which the ordering measures) grows as
# the square of its length, its spread over masks at one timestep only linearly
VOCAB, PROMPT, RESPONSE = 32, 4, 60
MASK = 2
CFG = ModelConfig(
    d_model=32,
    n_layers=1,
    n_heads=2,
    n_kv_heads=2,
    mlp_hidden_size=64,
    vocab_size=VOCAB,
    max_sequence_length=64,
)
# one pair under this many pair indices: the variance ordering's draws per allocation (its
# ratios sit near 2, so 256 keeps each estimate within ~10%) and the shared-noise test's
# (a ratio of hundreds to thousands needs few)
PAIRS, SHARED_NOISE_PAIRS = 256, 64


def repeated_token_rows(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, PROMPT + RESPONSE): a random prompt, then one random token repeated."""
    prompt = torch.randint(3, VOCAB, (n, PROMPT), generator=g)
    token = torch.randint(3, VOCAB, (n, 1), generator=g)
    return torch.cat([prompt, token.expand(n, RESPONSE)], dim=1)


@pytest.fixture(scope="module")
def trained() -> LLaDAModel:
    torch.manual_seed(0)
    model = LLaDAModel(CFG)
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sft = SFTObjective(ObjectiveConfig(name="sft", loss_chunk_rows=0), MASK)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        x = repeated_token_rows(16, g)
        loss = sft(model, {"input_ids": x, "prompt_len": torch.full((16,), PROMPT)}, g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def with_queries_scaled(model: LLaDAModel, scale: float) -> LLaDAModel:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith("q_proj.weight"):
                p.mul_(scale)
    return out.eval()


def repeated_pair_batch(pairs: int) -> dict[str, torch.Tensor]:
    """One (chosen, rejected) pair under ``pairs`` pair indices: rows chosen..., rejected..."""
    x = repeated_token_rows(2, torch.Generator().manual_seed(2))
    ids = torch.cat([x[:1].expand(pairs, -1), x[1:].expand(pairs, -1)])
    return {
        "input_ids": ids,
        "prompt_len": torch.full((2 * pairs,), PROMPT),
        "sample_index": torch.arange(pairs),
    }


def score_variance(
    policy, reference, n_t: int, n_yt: int, shared: bool = True, pairs: int = PAIRS
) -> float:
    """The variance over ``pairs`` independent draws of the pair's DPO score."""
    cfg = ObjectiveConfig(
        name="vrpo",
        elbo_timesteps=n_t,
        elbo_masks_per_timestep=n_yt,
        shared_reference_noise=shared,
        loss_chunk_rows=0,
    )
    objective = VRPOObjective(cfg, MASK)
    objective.reference._frozen = reference  # the frozen copy, without a folder
    with torch.no_grad():
        score = objective.scores(policy, repeated_pair_batch(pairs), NoiseKey(0, 0)).score
    return float(score.var())


def test_score_variance_falls_as_the_budget_moves_to_timesteps(trained):
    policy = with_queries_scaled(trained, 0.0)
    var = [score_variance(policy, trained, n_t, 8 // n_t) for n_t in (1, 2, 4, 8)]
    ratios = [var[i] / var[i + 1] for i in range(3)]
    print(
        f"score variance for (n_t, n_yt) = (1,8) (2,4) (4,2) (8,1): "
        f"{', '.join(f'{v:.4g}' for v in var)}; ratios {', '.join(f'{r:.2f}' for r in ratios)}"
    )
    # V = V_t / n_t + V_mask / 8: each halving of n_yt can at most halve it. Measured at noise
    # seeds 0-2 and training seeds 0 and 7: ratios 1.54-2.58, (1,8)/(8,1) 5.9-7.6
    assert all(r > 1.15 for r in ratios), ratios
    assert var[0] / var[3] > 3.0


def test_shared_reference_noise_beats_independent_noise(trained):
    policy = with_queries_scaled(trained, 0.9)  # a policy near its reference, as in training
    shared, independent = (
        score_variance(policy, trained, 8, 1, s, SHARED_NOISE_PAIRS) for s in (True, False)
    )
    print(
        f"score variance at (8,1): shared noise {shared:.4g}, independent {independent:.4g} "
        f"(ratio {independent / shared:.3g})"
    )
    assert independent > 50 * shared  # measured 815-3845 (the seeds above)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    model = LLaDAModel(CFG)
    model.init_weights(torch.Generator().manual_seed(3))
    return save_pretrained(
        dict(model.named_parameters()), CFG, tmp_path_factory.mktemp("ref") / "m"
    )


def test_loss_is_log2_when_the_policy_is_the_reference(base_folder):
    cfg = ObjectiveConfig(
        name="vrpo", reference="frozen_copy", reference_path=str(base_folder), loss_chunk_rows=16
    )
    prepare_run(cfg, CFG, 64, [])  # the reference's config.json matches the policy's
    objective = build_objective(cfg, MASK)
    policy = load_pretrained(base_folder)
    batch = repeated_pair_batch(3)
    batch["input_ids"][3:, -5:] = 1  # a rejected response padded with EOS: still log 2
    out = objective(policy, batch, NoiseKey(5, 7))
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    out.loss.backward()  # the policy's ELBOs carry gradients; the reference's do not
    assert all(p.grad is not None for p in policy.parameters())
    assert all(
        p.grad is None for p in objective.reference.frozen_copy(policy, torch.device("cpu")).parameters()
    )


def test_lora_base_reference_is_the_adapter_free_model(base_folder):
    pytest.importorskip("peft")
    from llada_train.model.lora import PeftConfig, apply_lora

    policy = load_pretrained(base_folder)
    apply_lora(policy, PeftConfig(method="lora", r=4), str(base_folder), seed=0)
    cfg = ObjectiveConfig(name="vrpo", reference="lora_base", loss_chunk_rows=0)
    objective = build_objective(cfg, MASK)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    out = objective(policy, repeated_pair_batch(2), NoiseKey(1, 0))
    assert abs(out.loss.item() - math.log(2)) < 1e-6  # LoRA's B starts at 0: policy = base
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():  # a moved adapter: the reference stays the base, the loss moves
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    moved = objective(policy, repeated_pair_batch(2), NoiseKey(1, 0)).loss.item()
    assert abs(moved - math.log(2)) > 1e-3


def test_draws_are_keyed_by_pair_not_by_batch(trained):
    """A pair's score is the same alone or beside another pair, its draws the same padded
    longer or not; another step draws anew."""
    objective = VRPOObjective(ObjectiveConfig(name="vrpo", loss_chunk_rows=0), MASK)
    objective.reference._frozen = with_queries_scaled(trained, 0.5)
    both = repeated_pair_batch(2)
    both["sample_index"] = torch.tensor([10, 11])
    alone = {
        "input_ids": both["input_ids"][[0, 2]],
        "prompt_len": both["prompt_len"][[0, 2]],
        "sample_index": torch.tensor([10]),
    }
    with torch.no_grad():
        s_both = objective.scores(trained, both, NoiseKey(0, 3)).score
        s_alone = objective.scores(trained, alone, NoiseKey(0, 3)).score
        s_next_step = objective.scores(trained, alone, NoiseKey(0, 4)).score
    assert torch.allclose(s_both[:1], s_alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(s_alone, s_next_step, rtol=1e-3)
    pairs, resp = torch.arange(64).repeat(2), torch.tensor([0] * 64 + [1] * 64)
    short, long = (elbo_draws(NoiseKey(0, 3), pairs, resp, n, 4, 2, 1e-3) for n in (44, 60))
    assert torch.equal(short.p, long.p) and torch.equal(short.u, long.u[:, :, :44])
    assert torch.equal(short.p[:, 0::2], short.p[:, 1::2])  # n_yt = 2 masks share each t
    # (128, 8, 60) uniforms and (128, 4) distinct timesteps: uniform on [0, 1)
    assert abs(long.u.mean().item() - 0.5) < 0.01 and abs(long.u.std().item() - 0.2887) < 0.01
    assert abs(short.p[:, 0::2].mean().item() - 0.5) < 0.06


def test_bad_vrpo_settings_are_one_line(base_folder, tmp_path):
    with pytest.raises(LladaError, match="objective.reference='frozen'"):
        build_objective(ObjectiveConfig(name="vrpo", reference="frozen"), MASK)
    with pytest.raises(LladaError, match="elbo_timesteps=0"):
        build_objective(ObjectiveConfig(name="vrpo", elbo_timesteps=0), MASK)
    with pytest.raises(LladaError, match="needs the reference weights"):
        prepare_run(ObjectiveConfig(name="vrpo"), CFG, 64, [])
    other = dataclasses.replace(CFG, n_layers=3)
    with pytest.raises(LladaError, match="differs from the policy in n_layers"):
        prepare_run(ObjectiveConfig(name="vrpo", reference_path=str(base_folder)), other, 64, [])
    policy = load_pretrained(base_folder)
    lora_ref = build_objective(ObjectiveConfig(name="vrpo", reference="lora_base"), MASK)
    with pytest.raises(LladaError, match="needs LoRA adapters on the policy: set peft=lora"):
        lora_ref(policy, repeated_pair_batch(1), NoiseKey(0, 0))


def test_preference_metrics_by_hand_and_their_step_means():
    """beta * bracket, the share of positive margins, and the mean ELBO deltas per response;
    the loop's ``StepSums`` averages each over the step's micro-batches."""
    policy = torch.tensor([-10.0, -20.0, -30.0, -12.0, -18.0, -33.0])  # (2B,) chosen, rejected
    reference = torch.tensor([-11.0, -20.0, -28.0, -11.0, -19.0, -29.0])  # (2B,)
    # deltas: chosen (1, 0, -2), rejected (-1, 1, -4); brackets 2, -1, 2; beta 0.1
    score = 0.1 * torch.tensor([2.0, -1.0, 2.0])  # (B,)
    m = preference_metrics(PreferenceScores(score, policy, reference, torch.tensor(0)))
    expected = {
        "vrpo/reward_margin": 0.1,
        "vrpo/reward_accuracy": 2 / 3,
        "vrpo/chosen_elbo_delta": -1 / 3,
        "vrpo/rejected_elbo_delta": -4 / 3,
    }
    assert {k: v.item() for k, v in m.items()} == pytest.approx(expected, abs=1e-6)
    sums = StepSums(torch.device("cpu"))
    sums.add(torch.tensor(1.0), 4, m)
    sums.add(torch.tensor(1.0), 4, {k: torch.zeros(()) for k in m})
    halved = {k: v / 2 for k, v in expected.items()}
    assert sums.agree(stop_requested=False).metrics == pytest.approx(halved, abs=1e-6)
