"""The model's own prefix KV cache (issue 11): recording, suffix passes, the fast sampler.

References are the plain forward pass and, where the cache is approximate by design, the
block written out by hand here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, ModelConfig, PrefixCache
from llada_train.model.layers import apply_rotary, rotary_cos_sin
from llada_train.sample import fast_generate, left_pad

MASK, EOS, PAD = 23, 1, 1


def gqa_model(init_std: float = 0.3, seed: int = 1) -> LLaDAModel:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64,
                      vocab_size=24, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD,
                      bos_token_id=0, init_std=init_std)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LLaDAModel:
    return gqa_model()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 11 tokens, the second left-padded by 3 (attention mask 0 there)."""
    x = torch.randint(0, MASK, (2, 11), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 11, dtype=torch.long)
    attn[1, :3] = 0
    return x, attn


def manual_cached_suffix(model, full_x, suffix, keep, attn):
    """The block written out: keys/values of positions [0, keep) from a full pass over
    ``full_x``, then ``suffix`` at positions [keep, ...) attending to them and to itself."""
    cfg, t = model.config, model.transformer
    B, L = full_x.shape
    cos, sin = rotary_cos_sin(L, cfg.head_dim, cfg.rope_theta, full_x.device)
    key_mask = attn.bool()[:, None, None, :]  # (B, 1, 1, L)

    def run(h, pos, past):
        records = []
        for i, blk in enumerate(t.blocks):
            a = blk.attn_norm(h)
            n = h.shape[1]
            q = blk.q_proj(a).view(B, n, cfg.n_heads, -1).transpose(1, 2)
            k = blk.k_proj(a).view(B, n, cfg.n_kv_heads, -1).transpose(1, 2)
            v = blk.v_proj(a).view(B, n, cfg.n_kv_heads, -1).transpose(1, 2)
            q, k = apply_rotary(q, cos[pos], sin[pos]), apply_rotary(k, cos[pos], sin[pos])
            if past is not None:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            records.append((k[:, :, :keep], v[:, :, :keep]))
            rep = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
            h = h + blk.attn_out(out.transpose(1, 2).reshape(B, n, -1))
            m = blk.ff_norm(h)
            h = h + blk.ff_out(F.silu(blk.ff_proj(m)) * blk.up_proj(m))
        return h, records

    _, past = run(t.wte(full_x), slice(0, L), None)
    h, _ = run(t.wte(suffix), slice(keep, L), past)
    return t.ff_out(t.ln_f(h))  # (B, L - keep, V)


@torch.no_grad()
def test_empty_cache_pass_is_the_plain_forward_and_records_the_prefix(model, batch):
    x, attn = batch
    cache = PrefixCache(keep=6)
    assert not cache.filled and cache.length == 0
    out = model(x, attention_mask=attn, cache=cache)
    assert torch.equal(out, model(x, attention_mask=attn))
    assert cache.filled and cache.length == 6 and len(cache.keys) == len(cache.values) == 2
    assert cache.keys[0].shape == (2, 2, 6, 8)  # (B, H_kv, keep, hd): GQA keeps H_kv heads


@torch.no_grad()
def test_suffix_pass_equals_the_full_pass_when_the_suffix_is_unchanged(model, batch):
    x, attn = batch
    full = model(x, attention_mask=attn)
    cache = PrefixCache(keep=6)
    model(x, attention_mask=attn, cache=cache)
    for _ in range(2):  # a suffix pass reads the cache and leaves it as it was
        suffix = model(x[:, 6:], attention_mask=attn, cache=cache)  # (B, 5, V)
        torch.testing.assert_close(suffix, full[:, 6:], rtol=1e-5, atol=1e-5)
        assert cache.length == 6
    hidden = model(x[:, 6:], attention_mask=attn, cache=cache, return_hidden=True)
    plain_hidden = model(x, attention_mask=attn, return_hidden=True)
    torch.testing.assert_close(hidden, plain_hidden[:, 6:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_suffix_pass_with_new_tokens_attends_to_the_recorded_prefix(model, batch):
    x, attn = batch
    cache = PrefixCache(keep=6)
    model(x, attention_mask=attn, cache=cache)
    changed = x.clone()
    changed[:, 7:] = (x[:, 7:] + 5) % MASK
    cached = model(changed[:, 6:], attention_mask=attn, cache=cache)
    reference = manual_cached_suffix(model, x, changed[:, 6:], 6, attn)
    torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-5)
    # approximate by design: a fresh full pass would see the new tokens from the prefix too
    fresh = model(changed, attention_mask=attn)[:, 6:]
    assert not torch.allclose(cached, fresh, atol=1e-3)


@torch.no_grad()
def test_cache_misuse_is_a_clear_error_and_clear_starts_over(model, batch):
    x, attn = batch
    cache = PrefixCache(keep=4)
    model(x, attention_mask=attn, cache=cache)
    with pytest.raises(LladaError, match="4 cached"):
        model(x[:, 4:], attention_mask=attn[:, 4:], cache=cache)  # mask must cover the prefix
    with pytest.raises(LladaError, match="keep"):
        PrefixCache(keep=-1)
    one_layer = gqa_model()
    one_layer.transformer.blocks = one_layer.transformer.blocks[:1]
    shallow = PrefixCache(keep=4)
    one_layer(x, attention_mask=attn, cache=shallow)
    with pytest.raises(LladaError, match="1 layers"):  # recorded by another model
        model(x[:, 4:], attention_mask=attn, cache=shallow)
    cache.clear()
    assert not cache.filled
    model(x[:1], attention_mask=attn[:1], cache=cache)  # records afresh, here for one row
    assert cache.keys[1].shape[0] == 1 and cache.length == 4


# Outputs of fast_generate(use_cache=True) computed with the implementation before the model
# owned its cache (sample/fast.py's hand-written block walk, commit 1999fda), same model,
# prompts and settings. Generated tokens only (the prompt is 5 wide, left-padded).
BEFORE_REFACTOR = {
    "fixed": [
        [7, 7, 14, 14, 14, 7, 7, 7, 13, 7, 7, 7, 7, 7, 13, 13],
        [13, 21, 6, 13, 3, 3, 6, 19, 15, 17, 6, 3, 19, 2, 17, 17],
        [18, 16, 7, 14, 8, 19, 12, 12, 12, 6, 8, 8, 8, 19, 12, 1],
    ],
    "threshold": [
        [7, 7, 14, 14, 14, 7, 7, 7, 13, 7, 7, 7, 7, 1, 13, 18],
        [13, 21, 6, 13, 3, 3, 6, 19, 15, 17, 3, 3, 3, 4, 6, 7],
        [18, 16, 7, 14, 8, 7, 12, 12, 19, 6, 8, 3, 6, 6, 19, 12],
    ],
}


@pytest.mark.parametrize(("name", "kw", "nfe", "row_nfe"), [
    ("fixed", dict(threshold=None, steps=16), 16, [16, 16, 16]),
    ("threshold", dict(threshold=0.3), 14, [11, 14, 12]),
])  # fmt: skip
def test_fast_generate_with_cache_is_unchanged_by_the_refactor(model, name, kw, nfe, row_nfe):
    ids, attn = left_pad([[3, 4, 5, 9, 10], [6, 7], [8, 9, 10]], PAD)
    args = dict(mask_token_id=MASK, attention_mask=attn, **kw)
    cached = fast_generate(model, ids, 16, 4, use_cache=True, **args)
    assert cached.generated.tolist() == BEFORE_REFACTOR[name]
    assert cached.nfe == nfe and cached.row_nfe.tolist() == row_nfe
    # the pin is about the cache: uncached decoding of these prompts differs
    assert not torch.equal(fast_generate(model, ids, 16, 4, **args).tokens, cached.tokens)
