"""In-loop validation: fixed stratified draws, the standard error, an independent reference,
and the held-out carve that training never reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llada_train.data import PretrainDataConfig, build_pretrain_reader
from llada_train.model import LLaDAModel, ModelConfig
from llada_train.train.validation import ValidationConfig, Validator, item_draws, mean_and_se
from tests.conftest_data import counting_shards

V, MASK = 40, 2


def tiny_model() -> LLaDAModel:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                      vocab_size=V, mask_token_id=MASK)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def test_standard_error_by_hand():
    # mean 3; deviations -2, -1, 0, 3: squares sum to 14, sample variance 14 / 3, se = sqrt(14/3) / 2
    mean, se = mean_and_se(np.array([1.0, 2.0, 3.0, 6.0]))
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2, rel=1e-12)
    assert math.isnan(mean_and_se(np.array([2.0]))[1])  # one item: no spread to measure


def test_t_is_stratified_and_the_draws_are_fixed():
    eps = 1e-3
    p, u = item_draws(seed=3, item=5, samples=8, length=10, eps=eps)
    t = (p.double() - eps) / (1 - eps)
    assert torch.equal(torch.floor(t * 8).long(), torch.arange(8))  # one copy per t-bucket
    assert u.shape == (8, 10) and bool(((u >= 0) & (u < 1)).all())
    p2, u2 = item_draws(3, 5, 8, 10, eps)
    assert torch.equal(p, p2) and torch.equal(u, u2)  # same item: same draws, every time
    assert not torch.equal(item_draws(3, 6, 8, 10, eps)[1], u)  # another item: other draws


def reference_elbo(model, items, seed, samples, eps, eos=None) -> list[float]:
    """Per-item ELBO per token by explicit loops over copies and full-vocabulary logits
    (``eos`` set: each document attends only to itself)."""
    out = []
    for i, (ids, prompt) in enumerate(items):
        x = torch.as_tensor(ids)
        L = len(x)
        p, u = item_draws(seed, i, samples, L, eps)
        vals = []
        for k in range(samples):
            masked = (u[k] < p[k]) & (torch.arange(L) >= prompt)
            noisy = torch.where(masked, torch.full_like(x, MASK), x)
            kw = {}
            if eos is not None:  # document index: a new one after each EOS, written out here
                kw["document_ids"] = torch.tensor([[sum(int(t) == eos for t in x[:j])
                                                    for j in range(L)]])
            with torch.no_grad():
                logp = torch.log_softmax(model(noisy[None], **kw)[0].double(), dim=-1)  # (L, V)
            nll = -logp[torch.arange(L), x][masked].sum()
            vals.append(float(nll) / float(p[k]) / (L - prompt))
        out.append(sum(vals) / samples)
    return out


def test_validator_equals_an_explicit_sum_repeats_exactly_and_touches_no_rng():
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(1)
    items = [(torch.randint(3, V, (12,), generator=gen).numpy(), 0) for _ in range(3)]
    items.append((torch.randint(3, V, (9,), generator=gen).numpy(), 4))  # SFT-like: prompt of 4
    cfg = ValidationConfig(every=1, windows=4, samples_per_window=5, rows_per_forward=2,
                           eps=1e-3, seed=7, loss_chunk_rows=3)
    val = Validator(items, cfg, MASK, rank=0, world=1, device=torch.device("cpu"))
    rng = torch.get_rng_state()
    first, second = val.run(model), val.run(model)
    assert (first.loss, first.loss_se) == (second.loss, second.loss_se)  # bitwise
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    ref = np.array(reference_elbo(model.eval(), items, 7, 5, 1e-3))
    assert first.loss == pytest.approx(ref.mean(), rel=1e-5)
    assert first.loss_se == pytest.approx(ref.std(ddof=1) / 2, rel=1e-4)  # sqrt(4 items) = 2
    m = first.metrics()
    assert m["val_bpt"] == pytest.approx(first.loss / math.log(2))


def test_validator_with_document_mask_keeps_attention_inside_documents():
    model = tiny_model().eval()
    eos = 1
    items = [(np.array([5, 9, eos, 7, 8, 12, eos, 30, 31, 6]), 0),
             (np.array([4, 4, 4, eos, 20, 21, 22, 23, 24, 25]), 0)]
    cfg = ValidationConfig(every=1, samples_per_window=4, rows_per_forward=4, seed=2)
    packed = Validator(items, cfg, MASK, 0, 1, torch.device("cpu"), document_eos=eos).run(model)
    plain = Validator(items, cfg, MASK, 0, 1, torch.device("cpu")).run(model)
    ref = np.array(reference_elbo(model, items, 2, 4, cfg.eps, eos=eos))
    assert packed.loss == pytest.approx(ref.mean(), rel=1e-5)
    assert abs(packed.loss - plain.loss) > 1e-4


def test_val_fraction_holds_out_the_last_windows_and_training_never_reads_them(tmp_path):
    L = 16
    counting_shards(tmp_path / "s", [100, 156])  # 256 tokens: 16 windows of 16
    cfg = PretrainDataConfig(path=str(tmp_path / "s"), tokenizer=None, val_fraction=0.25)
    reader, info = build_pretrain_reader(cfg, L, micro_batch_size=3, seed=0, rank=0, world_size=1)
    seen = set()
    for _ in range(30):  # 90 samples: more than seven epochs of the 12 training windows
        batch = next(reader)
        seen |= set((batch["input_ids"][:, 0] // L).tolist())
    assert seen == set(range(12))  # every training window, none of the held-out four
    held = info.validation
    assert held.size == 4
    # centres of the two halves of the pool (1 and 3 of 0..3)
    assert [int(ids[0]) // L for ids, _ in held.take(2)] == [13, 15]
    assert [int(ids[0]) // L for ids, _ in held.take(10)] == [12, 13, 14, 15]


def test_sample_index_is_the_global_stream_position(tmp_path):
    counting_shards(tmp_path / "s", [512])
    cfg = PretrainDataConfig(path=str(tmp_path / "s"), tokenizer=None)
    r1, _ = build_pretrain_reader(cfg, 16, micro_batch_size=2, seed=0, rank=1, world_size=2)
    assert next(r1)["sample_index"].tolist() == [2, 3]  # rank 1 takes the second block of 2
    assert next(r1)["sample_index"].tolist() == [6, 7]


def test_val_path_reads_held_out_shards_and_leaves_training_whole(tmp_path):
    L = 16
    counting_shards(tmp_path / "train", [256])  # 16 windows
    counting_shards(tmp_path / "val", [64], offset=1000)  # 4 windows: tokens 1000..1063
    cfg = PretrainDataConfig(path=str(tmp_path / "train"), tokenizer=None,
                             val_path=str(tmp_path / "val"), val_fraction=0.5)  # val_path wins
    reader, info = build_pretrain_reader(cfg, L, micro_batch_size=4, seed=0, rank=0, world_size=1)
    assert reader.sched.sizes == [16]
    assert [int(ids[0]) for ids, prompt in info.validation.take(4)] == [1000, 1016, 1032, 1048]
