"""Document-masked attention: a packed window scores each document as if it ran alone."""

from __future__ import annotations

import pytest
import torch

from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, ModelConfig

V = 40


def build(causal: bool) -> LLaDAModel:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                      vocab_size=V, causal=causal)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@pytest.mark.parametrize("causal", [False, True])
def test_packed_window_equals_documents_run_separately(causal):
    model = build(causal)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, V, (n,), generator=gen) for n in (5, 3, 7)]
    packed = torch.cat(docs)[None]  # (1, 15)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    out = model(packed, document_ids=doc_ids)[0]
    start = 0
    for d in docs:
        alone = model(d[None])[0]  # positions restart at 0: no position reset in the packed run
        torch.testing.assert_close(out[start : start + len(d)], alone, rtol=1e-5, atol=1e-5)
        start += len(d)
    # without document_ids the later documents see the earlier ones: the mask is what matters
    assert (model(packed)[0, 5:8] - out[5:8]).abs().max() > 1e-4


def test_rope_alone_is_not_what_isolates_documents():
    """The same tokens at shifted absolute positions give the same logits (RoPE is relative),
    which is why the packed test needs no position reset; a mask that leaked across documents
    would still fail it."""
    model = build(causal=False)
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(2))
    cos, sin = model.rope.get(4, 6, ids.device)  # the same pass, phases of positions 4..9
    x = model.transformer.wte(ids)
    for block in model.transformer.blocks:
        x = block(x, cos, sin, None)
    shifted = model.transformer.ff_out(model.transformer.ln_f(x))
    torch.testing.assert_close(shifted, model(ids), rtol=1e-4, atol=1e-4)


def test_document_ids_with_padding_stay_finite():
    model = build(causal=True)
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(3))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 2, 2]])
    mask = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])  # row 1 ends in a padding "document"
    out = model(ids, mask, document_ids=doc_ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, 4:6], model(ids[1:, 4:6])[0], rtol=1e-5, atol=1e-5)


def test_document_ids_bad_shape_is_one_line():
    model = build(causal=False)
    with pytest.raises(LladaError, match=r"document_ids has shape \(1, 4\); expected"):
        model(torch.ones(1, 6, dtype=torch.long), document_ids=torch.zeros(1, 4, dtype=torch.long))
