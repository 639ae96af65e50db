"""The autoregressive twin: causal attention, next-token objective, AR decoding and likelihood."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from llada_train.diffusion import ARObjective, ObjectiveConfig, build_objective
from llada_train.errors import LladaError
from llada_train.model import (
    LLaDAModel,
    ModelConfig,
    PrefixCache,
    count_parameters,
    read_config,
    save_pretrained,
)
from llada_train.sample import ar_generate, ar_log_likelihood
from tests.conftest import REPO

V = 40


def small_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=V)
    return ModelConfig(**{**base, **kw})


def build(causal: bool = True, seed: int = 0, **kw) -> LLaDAModel:
    model = LLaDAModel(small_cfg(causal=causal, **kw))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def test_causal_mask_hides_later_tokens():
    model = build(causal=True)
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1 - 3) % (V - 3) + 3  # a different token at position 6
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)  # earlier: bit-identical
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=-1).min() > 1e-4  # position 6 and every later one


def test_bidirectional_model_sees_later_tokens():
    model = build(causal=False)
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 7] = ids[0, 7] % (V - 1) + 1
    assert (model(ids)[0, 0] - model(changed)[0, 0]).abs().max() > 1e-4


def test_explicit_causal_mask_equals_is_causal_kernel():
    """An all-ones padding mask forces the explicit (mask-building) path; a left-padded row
    scores its real tokens as unpadded (RoPE is relative)."""
    model = build(causal=True)
    ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(3))
    plain = model(ids)
    torch.testing.assert_close(model(ids, torch.ones_like(ids)), plain, rtol=1e-5, atol=1e-5)
    padded = torch.cat([torch.ones(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    out = model(padded, mask)
    assert torch.isfinite(out).all()  # pad queries see at least themselves: no NaN anywhere
    torch.testing.assert_close(out[:, 3:], plain, rtol=1e-5, atol=1e-5)


def test_twins_have_equal_parameters():
    diff, ar = small_cfg(causal=False), small_cfg(causal=True)
    assert count_parameters(diff) == count_parameters(ar)
    a, b = build(causal=False, seed=5), build(causal=True, seed=5)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights


def test_causal_flag_round_trips_through_config_json(tmp_path):
    model = build(causal=True)
    out = save_pretrained(model.state_dict(), model.config, tmp_path / "ar")
    raw = json.loads((out / "config.json").read_text())
    assert raw["causal"] is True and raw["include_qkv_bias"] is False
    assert read_config(out).causal is True
    raw.pop("causal")  # a released config has no such key: bidirectional
    assert ModelConfig.from_llada_json(raw).causal is False


class ControlledModel(nn.Module):
    """Hidden states chosen by the test; ln_f is the identity and the head the identity matrix,
    so logits == hidden and the loss can be computed by hand."""

    def __init__(self, hidden: torch.Tensor, **cfg) -> None:
        super().__init__()
        self.hidden = hidden
        vocab = hidden.shape[-1]
        self.config = ModelConfig(d_model=4, n_heads=2, n_kv_heads=2, vocab_size=vocab,
                                  mask_token_id=0, eos_token_id=0, pad_token_id=0, **cfg)
        head = nn.Linear(vocab, vocab, bias=False)
        head.weight.data = torch.eye(vocab)
        self.transformer = nn.ModuleDict({"ln_f": nn.Identity(), "ff_out": head})

    def forward(self, ids, attention_mask=None, *, return_hidden=False, document_ids=None):
        assert return_hidden
        return self.hidden


def ce(logits: list[float], target: int) -> float:
    return -(logits[target] - math.log(sum(math.exp(z) for z in logits)))


HIDDEN = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
TOKENS = torch.tensor([[1, 0, 2, 1]])


@pytest.mark.parametrize("chunk", [0, 1, 1024])
def test_ar_loss_by_hand(chunk):
    obj = ARObjective(ObjectiveConfig(name="ar", loss_chunk_rows=chunk))
    out = obj(ControlledModel(HIDDEN, causal=True), {"input_ids": TOKENS})
    h = HIDDEN[0].tolist()
    # row i predicts token i+1; the last row predicts nothing
    expected = (ce(h[0], 0) + ce(h[1], 2) + ce(h[2], 1)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert int(out.num_masked) == 3 and out.num_tokens == 4


def test_ar_loss_sft_rows_and_shifted_logits():
    obj = ARObjective(ObjectiveConfig(name="ar", loss_chunk_rows=0))
    h = HIDDEN[0].tolist()
    batch = {"input_ids": TOKENS, "prompt_len": torch.tensor([2])}  # predict tokens 2 and 3 only
    out = obj(ControlledModel(HIDDEN, causal=True), batch)
    assert out.loss.item() == pytest.approx((ce(h[1], 2) + ce(h[2], 1)) / 2, rel=1e-6)
    # shift_logits: row i already predicts token i; row 0 predicts nothing
    out = obj(ControlledModel(HIDDEN, causal=True, shift_logits=True), {"input_ids": TOKENS})
    expected = (ce(h[1], 0) + ce(h[2], 2) + ce(h[3], 1)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_ar_targets_with_padding():
    from llada_train.diffusion import ar_targets

    x = torch.tensor([[9, 9, 4, 5, 6], [4, 5, 6, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])  # left pad / right pad
    targets, predicted = ar_targets(x, False, attention_mask=mask)
    # row 0: positions 2, 3 predict 5, 6; row 1: positions 0..2 predict 5, 6, 7
    assert predicted.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]
    assert targets[0, 2:4].tolist() == [5, 6] and targets[1, :3].tolist() == [5, 6, 7]
    targets, predicted = ar_targets(x, True, attention_mask=mask)  # shifted: row i predicts i
    assert predicted.tolist() == [[False, False, False, True, True], [False, True, True, True, False]]


def test_ar_objective_refuses_bidirectional_model():
    obj = build_objective(ObjectiveConfig(name="ar"), mask_token_id=2)
    with pytest.raises(LladaError, match=r"model\.causal=true"):
        obj(build(causal=False), {"input_ids": torch.randint(3, V, (1, 6))})


def test_ar_objective_from_yaml_trains():
    raw = OmegaConf.load(REPO / "conf" / "objective" / "ar.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ObjectiveConfig), raw))
    obj = build_objective(cfg, mask_token_id=2)
    model = build(causal=True).train()
    batch = {"input_ids": torch.randint(3, V, (4, 12), generator=torch.Generator().manual_seed(4))}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = obj(model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), rel=0.1)  # near uniform at init
    assert losses[-1] < 0.7 * losses[0]


def test_ar_log_likelihood_by_hand():
    model = build(causal=True)
    gen = torch.Generator().manual_seed(6)
    prompt, cont = torch.randint(3, V, (2, 4), generator=gen), torch.randint(3, V, (2, 5), generator=gen)
    got = ar_log_likelihood(model, prompt, cont)
    for b in range(2):
        total = 0.0
        for j in range(5):  # one truncated pass per token: log p(c_j | prompt, c_<j)
            seq = torch.cat([prompt[b], cont[b, :j]])[None]
            logp = torch.log_softmax(model(seq)[0, -1].double(), dim=-1)
            total += logp[cont[b, j]].item()
        assert got[b].item() == pytest.approx(total, abs=1e-5)


def test_ar_generate_cache_equals_full_passes_and_greedy():
    model = build(causal=True)
    prompt = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(7))
    cached = ar_generate(model, prompt, 6)
    full = ar_generate(model, prompt, 6, use_cache=False)
    assert torch.equal(cached.tokens, full.tokens) and cached.nfe == full.nfe == 6
    for j in range(6):  # each generated token is the argmax given everything before it
        seq = cached.tokens[:, : 5 + j]
        assert torch.equal(model(seq)[:, -1].argmax(-1), cached.tokens[:, 5 + j])


def test_ar_generate_left_padding_and_temperature():
    model = build(causal=True)
    short = torch.tensor([[7, 8, 9]])
    long = torch.tensor([[5, 6, 10, 11, 12]])
    ids = torch.cat([torch.cat([torch.ones(1, 2, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    both = ar_generate(model, ids, 5, attention_mask=mask)
    assert torch.equal(both.generated[0], ar_generate(model, short, 5).generated[0])
    assert torch.equal(both.generated[1], ar_generate(model, long, 5).generated[0])
    g1, g2 = (torch.Generator().manual_seed(9) for _ in range(2))
    a = ar_generate(model, long, 8, temperature=1.0, generator=g1)
    b = ar_generate(model, long, 8, temperature=1.0, generator=g2, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)  # same seed, same draws with and without the cache


def test_ar_generate_stops_at_eos_and_refuses_bidirectional():
    model = build(causal=True)
    prompt = torch.tensor([[4, 5, 6]])
    first = ar_generate(model, prompt, 1).generated[0, 0].item()
    out = ar_generate(model, prompt, 6, eos_token_id=first)  # the first token is "EOS"
    assert out.nfe == 1 and out.generated.tolist() == [[first] * 6]
    with pytest.raises(LladaError, match="causal"):
        ar_generate(build(causal=False), prompt, 2)
    with pytest.raises(LladaError, match="shift_logits"):
        ar_log_likelihood(build(causal=True, shift_logits=True), prompt, prompt)


def test_shift_logits_moves_rows_and_cache_agrees():
    plain, shifted = build(causal=False, seed=3), build(causal=False, seed=3, shift_logits=True)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(8))
    a, b = plain(ids), shifted(ids)
    torch.testing.assert_close(b[:, 1:], a[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(b[:, 0], a[:, 0], rtol=0, atol=0)
    causal = dataclasses.replace(shifted.config, causal=True)
    model = LLaDAModel(causal)
    model.load_state_dict(shifted.state_dict())
    cache = PrefixCache(5)
    model(ids, cache=cache)  # records positions 0..4
    suffix = model(ids[:, 5:], cache=cache)
    torch.testing.assert_close(suffix, model(ids)[:, 5:], rtol=1e-5, atol=1e-5)
