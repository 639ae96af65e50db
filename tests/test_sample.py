"""The fixed-schedule reverse process (SPEC §5) against a line-by-line reference."""

from __future__ import annotations

import pytest
import torch

from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, ModelConfig
from llada_train.sample import generate, left_pad, num_transfer_schedule
from llada_train.sample.common import block_bounds, sample_tokens

MASK, EOS, EOT, PAD = 23, 1, 22, 1


def tiny_model(seed: int = 0) -> LLaDAModel:
    # a large init_std gives peaked, position-dependent predictions (varied tokens and confidences)
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden_size=64, vocab_size=24,
        mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=0, init_std=1.0,
    )
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LLaDAModel:
    return tiny_model()


def test_schedule_hand_worked():
    # M=10 over S=4: floor 2, remainder 2 -> the first two steps commit one more
    assert num_transfer_schedule(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]
    # fewer masks than steps: one per step, then nothing
    assert num_transfer_schedule(torch.tensor([3]), 5).tolist() == [[1, 1, 1, 0, 0]]
    # rows are independent
    sched = num_transfer_schedule(torch.tensor([8, 7, 0]), 4)
    assert sched.tolist() == [[2, 2, 2, 2], [2, 2, 2, 1], [0, 0, 0, 0]]
    assert sched.sum(1).tolist() == [8, 7, 0]


def test_block_bounds_hand_worked():
    assert block_bounds(5, 12, 4) == [(5, 9), (9, 13), (13, 17)]
    assert block_bounds(0, 6, 6) == [(0, 6)]
    with pytest.raises(LladaError):
        block_bounds(5, 12, 5)
    with pytest.raises(LladaError):
        generate(tiny_model(), torch.tensor([[3, 4]]), gen_length=8, steps=3, block_length=4, mask_token_id=MASK)


def reference_generate(model, rows, attn, gen_length, steps, block_length, cfg_scale=0.0,
                       forbid_eos=False, zero_conf_ids=()):
    """SPEC §5 written out position by position, in plain Python loops."""
    B, P = len(rows), len(rows[0])
    x = [list(r) + [MASK] * gen_length for r in rows]
    full_attn = None if attn is None else torch.cat([attn, torch.ones(B, gen_length, dtype=torch.long)], 1)
    num_blocks = gen_length // block_length
    S = steps // num_blocks
    calls = 0
    for b in range(num_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        M = [sum(1 for i in range(lo, hi) if x[r][i] == MASK) for r in range(B)]
        for step in range(S):
            xt = torch.tensor(x)
            with torch.no_grad():
                logits = model(xt, attention_mask=full_attn).float()
                calls += 1
                if cfg_scale > 0:
                    un = xt.clone()
                    un[:, :P] = MASK
                    un_logits = model(un, attention_mask=full_attn).float()
                    calls += 1
                    logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            if forbid_eos:
                logits[:, :, EOS] = float("-inf")
            probs = torch.softmax(logits, -1)  # MASK stays in the denominator, as released
            choice = logits.clone()
            choice[:, :, MASK] = float("-inf")  # MASK is never a prediction: only the choice skips it
            for r in range(B):
                k = M[r] // S + (1 if step < M[r] % S else 0)
                scored = []
                for i in range(lo, hi):  # only the current block; later positions stay masked
                    if x[r][i] != MASK:
                        continue
                    tok = int(choice[r, i].argmax())
                    conf = 0.0 if tok in zero_conf_ids else float(probs[r, i, tok])
                    scored.append((conf, i, tok))
                scored.sort(key=lambda t: -t[0])  # stable: ties keep position order
                for _, i, tok in scored[:k]:
                    x[r][i] = tok
    return torch.tensor(x), calls


@pytest.mark.parametrize(
    "gen_length,steps,block_length,kwargs",
    [
        (12, 12, 12, {}),  # one block, one token per step
        (12, 5, 12, {}),  # uneven schedule: 3,3,2,2,2
        (12, 6, 4, {}),  # semi-autoregressive, 2 steps per block
        (8, 8, 4, {"cfg_scale": 1.5}),
        (12, 6, 6, {"forbid_eos": True}),
        # eos_zero_confidence follows the released rule: tests/test_sample_eos_confidence.py
    ],
)
def test_matches_reference_at_temperature_zero(model, gen_length, steps, block_length, kwargs):
    rows = [[3, 4, 5, 9], [PAD, PAD, 6, 7]]  # second prompt left-padded
    ids, attn = left_pad([[3, 4, 5, 9], [6, 7]], PAD)
    assert ids.tolist() == rows
    want, calls = reference_generate(model, rows, attn, gen_length, steps, block_length, **kwargs)
    out = generate(
        model, ids, gen_length=gen_length, steps=steps, block_length=block_length,
        mask_token_id=MASK, attention_mask=attn, eos_token_id=EOS, eot_token_id=EOT,
        cfg_scale=kwargs.get("cfg_scale", 0.0), forbid_eos=kwargs.get("forbid_eos", False),
        eos_zero_confidence=bool(kwargs.get("zero_conf_ids")),
    )
    assert torch.equal(out.tokens, want)
    assert out.nfe == calls
    assert out.row_nfe.tolist() == [calls, calls]
    assert not (out.generated == MASK).any()
    if kwargs.get("forbid_eos"):
        assert not (out.generated == EOS).any()


def test_padding_is_invisible(model):
    # the pad tokens' identity must not matter when the attention mask hides them
    ids, attn = left_pad([[3, 4, 5, 9], [6, 7]], PAD)
    other = ids.clone()
    other[1, :2] = 11  # different garbage under the mask
    a = generate(model, ids, 8, 8, 4, mask_token_id=MASK, attention_mask=attn)
    b = generate(model, other, 8, 8, 4, mask_token_id=MASK, attention_mask=attn)
    assert torch.equal(a.generated, b.generated)


def test_later_blocks_stay_masked_until_their_turn(model):
    seen = []

    def recorder(x, attention_mask=None):
        seen.append(x.clone())
        return model(x, attention_mask=attention_mask)

    P, G, blk = 3, 12, 4
    out = generate(recorder, torch.tensor([[3, 4, 5]]), G, 6, blk, remasking="random", mask_token_id=MASK,
                   generator=torch.Generator().manual_seed(0))
    assert out.nfe == len(seen) == 6
    for call, x in enumerate(seen):
        block = call // 2  # 2 steps per block
        assert (x[0, P + (block + 1) * blk:] == MASK).all()
        assert not (x[0, P: P + block * blk] == MASK).any()
    assert not (out.generated == MASK).any()


def test_random_remasking_is_seeded(model):
    ids = torch.tensor([[3, 4, 5]])
    runs = [
        generate(model, ids, 8, 8, remasking="random", temperature=1.0, mask_token_id=MASK,
                 generator=torch.Generator().manual_seed(s)).tokens
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_gumbel_max_samples_softmax_at_temperature():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]).expand(1, 20000, 4)  # many identical positions
    T = 0.7
    draws = sample_tokens(logits, T, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.view(-1), minlength=4).double() / draws.numel()
    want = torch.softmax(logits[0, 0].double() / T, -1)
    assert torch.allclose(freq, want, atol=0.015)
    assert torch.equal(sample_tokens(logits, 0.0), torch.zeros(1, 20000, dtype=torch.long))
