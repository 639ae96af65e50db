"""The bidirectional mask predictor: shapes, attention semantics, parameter counts, layout."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from llada_train.errors import LladaError
from llada_train.model import (
    LLaDAModel,
    ModelConfig,
    count_parameters,
    load_pretrained,
    save_pretrained,
)
from llada_train.model.layers import apply_rotary, rotary_cos_sin
from tests.conftest import REPO


def preset(name: str) -> ModelConfig:
    """A shipped model preset, read through its schema like Hydra does."""
    raw = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


@pytest.fixture
def tiny() -> LLaDAModel:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=40,
                      mask_token_id=2)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def test_logits_shape(tiny):
    ids = torch.randint(0, 40, (3, 11))
    assert tiny(ids).shape == (3, 11, 40)


def test_attention_is_bidirectional(tiny):
    ids = torch.randint(3, 40, (1, 9), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 40
    with torch.no_grad():
        a, b = tiny(ids), tiny(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first position sees the last token


def test_padding_keys_do_not_affect_real_positions(tiny):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 40, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, 7:] = 0
    other = ids.clone()
    other[:, 7:] = torch.randint(3, 40, (2, 3), generator=gen)
    with torch.no_grad():
        a = tiny(ids, attention_mask=mask)
        b = tiny(other, attention_mask=mask)
        unpadded = tiny(ids[:, :7])
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert torch.allclose(a[:, :7], unpadded, atol=1e-5)  # same as never seeing the padding


def test_rotary_matches_complex_rotation():
    cos, sin = rotary_cos_sin(6, 8, 10000.0, torch.device("cpu"))
    x = torch.randn(1, 1, 6, 8)
    out = apply_rotary(x, cos, sin)
    # rotate-half pairs dimension i with i + d/2; as complex numbers: z * e^{i pos theta_i}
    z = torch.complex(x[..., :4], x[..., 4:])
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    angle = torch.arange(6).float()[:, None] * freqs[None, :]
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    assert torch.allclose(out, torch.cat([rotated.real, rotated.imag], dim=-1), atol=1e-5)


def test_grouped_kv_heads_equal_repeated_full_heads():
    gqa_cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden_size=16, vocab_size=20)
    mha_cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, mlp_hidden_size=16, vocab_size=20)
    gqa, mha = LLaDAModel(gqa_cfg), LLaDAModel(mha_cfg)
    gqa.init_weights(torch.Generator().manual_seed(0))
    state = gqa.state_dict()
    for name in ("k_proj", "v_proj"):
        w = state[f"model.transformer.blocks.0.{name}.weight"].view(2, 8, 32)
        state[f"model.transformer.blocks.0.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        assert torch.allclose(gqa(ids), mha(ids), atol=1e-5)


def test_llada_8b_preset_has_exactly_the_released_parameter_count():
    assert count_parameters(preset("llada_8b")) == 8_015_581_184


@pytest.mark.parametrize("name", ["tiny", "llada_1b"])
def test_preset_parameter_counts_match_the_formula(name):
    c = preset(name)
    hd = c.d_model // c.n_heads
    per_block = (
        c.d_model * c.n_heads * hd * 2  # q, attn_out
        + c.d_model * c.n_kv_heads * hd * 2  # k, v
        + 3 * c.d_model * c.mlp_hidden_size  # ff_proj, up_proj, ff_out
        + 2 * c.d_model  # norms
    )
    expected = c.n_layers * per_block + 2 * c.vocab_size * c.d_model + c.d_model
    assert count_parameters(c) == expected


def test_released_parameter_names(tiny):
    names = set(tiny.state_dict())
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"} <= names
    block = {n.split("blocks.1.")[1] for n in names if "blocks.1." in n}
    assert block == {
        f"{m}.weight"
        for m in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")
    }


@pytest.mark.parametrize("shard_bytes", [2**40, 20_000])
def test_save_load_round_trip_is_exact(tiny, tmp_path, shard_bytes):
    out = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "m", max_shard_bytes=shard_bytes)
    if shard_bytes < 2**40:
        assert (out / "model.safetensors.index.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["d_model"] == 32 and cfg["weight_tying"] is False and cfg["mask_token_id"] == 2
    loaded = load_pretrained(out)
    assert loaded.config == tiny.config
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(tiny(ids), loaded(ids))


def test_missing_shard_and_mismatched_config_are_clear_errors(tiny, tmp_path):
    out = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "m", max_shard_bytes=20_000)
    next(out.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(LladaError, match="missing"):
        load_pretrained(out)
    out = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "n")
    cfg = json.loads((out / "config.json").read_text())
    cfg["mlp_hidden_size"] = 64
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LladaError, match="does not match the weights"):
        load_pretrained(out)


def test_bad_shapes_in_config_are_rejected():
    with pytest.raises(LladaError, match="n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(LladaError, match="mask_token_id"):
        ModelConfig(vocab_size=10, mask_token_id=10)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny):
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    grads = []
    for flag in (False, True):
        tiny.config.activation_checkpointing = flag
        tiny.train()
        tiny.zero_grad()
        tiny(ids).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in tiny.named_parameters()})
    tiny.config.activation_checkpointing = False
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
