"""Exports load in transformers (trust_remote_code) with our logits; released folders load in ours.

The reference is our own ``LLaDAModel``; the transformers side is the modeling file copied
into the export, loaded exactly as a user would load it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llada_train.errors import LladaError
from llada_train.hf import AUTO_MAP, HF_FILES, write_hf_files
from llada_train.model import LLaDAModel, ModelConfig, load_pretrained, save_pretrained
from llada_train.model.checkpoint import INDEX_NAME
from tests.conftest import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never reach the Hub

GQA = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=40)
MHA = dict(GQA, n_kv_heads=4, rope_theta=500000.0)


@pytest.fixture
def transformers():
    """The ``hf`` extra (in the dev install CI uses); the file-only tests run without it."""
    return pytest.importorskip(
        "transformers", reason="transformers (the hf extra) is not installed"
    )


def random_model(cfg: ModelConfig, seed: int = 0) -> LLaDAModel:
    """fp32 model with random matrices and random (not all-one) norm weights."""
    model = LLaDAModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # RMSNorm scales: random so a misplaced scale shows up
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:  # std 1/sqrt(fan_in)-ish keeps logits O(1), where relative errors mean something
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def left_padded(
    batch: int, length: int, vocab: int, pads: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, L) and a mask with ``pads[b]`` leading zeros per row (EOS = PAD = 1)."""
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(pads):
        ids[b, :n], mask[b, :n] = 1, 0
    return ids, mask


@pytest.mark.parametrize("shape", [GQA, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("max_shard_bytes", [2**30, 8_000], ids=["single", "sharded"])
def test_export_loads_in_transformers_with_our_logits(
    transformers, tmp_path, shape, max_shard_bytes
):
    cfg = ModelConfig(**shape)
    ours = random_model(cfg)
    export = save_pretrained(
        ours.state_dict(), cfg, tmp_path / "export", max_shard_bytes=max_shard_bytes
    )
    assert (export / INDEX_NAME).exists() == (max_shard_bytes < 2**30)
    write_hf_files(export)
    ids, mask = left_padded(3, 12, cfg.vocab_size, pads=[0, 4, 9])
    with torch.no_grad():
        ref = ours(ids)  # (B, L, V)
        ref_masked = ours(ids, attention_mask=mask)
    for auto in (transformers.AutoModel, transformers.AutoModelForMaskedLM):
        hf, info = auto.from_pretrained(export, trust_remote_code=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert not info["mismatched_keys"], info
        assert type(hf).__name__ == "LLaDAModelLM"
        assert next(hf.parameters()).dtype == torch.float32
        with torch.no_grad():
            out = hf(ids)
            out_masked = hf(ids, attention_mask=mask)
        assert out.logits.shape == (3, 12, cfg.vocab_size)
        assert rel_err(ref, out.logits) < 1e-5
        # every position is compared, padded ones too: both models let padded queries attend
        # to the real keys, so even those rows must agree
        assert rel_err(ref_masked, out_masked.logits) < 1e-5
    # the padding mask did change something, so the masked comparison tests the masking
    assert rel_err(ref, ref_masked) > 1e-3


@pytest.mark.parametrize(
    "extra",
    [{"include_qkv_bias": True}, {"causal": True}, {"causal": True, "shift_logits": True}],
    ids=["qkv_bias", "causal", "causal_shift"],
)
def test_converted_and_ar_variants_load_with_our_logits(transformers, tmp_path, extra):
    # llada-convert writes Qwen2's q/k/v biases, the AR twin writes causal, AR adaptation
    # shift_logits: the export (which carries the modeling files by itself) must honour them
    cfg = ModelConfig(**GQA, **extra)
    ours = random_model(cfg, seed=3)
    export = save_pretrained(ours.state_dict(), cfg, tmp_path / "export")
    assert (export / "modeling_llada.py").exists()  # save_pretrained wrote the hf files
    ids, mask = left_padded(3, 12, cfg.vocab_size, pads=[0, 4, 9])
    hf = transformers.AutoModelForMaskedLM.from_pretrained(export, trust_remote_code=True)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) < 1e-5
        assert rel_err(ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits) < 1e-5


@pytest.mark.parametrize("extra", [{}, {"shift_logits": True}], ids=["plain", "shift"])
def test_block_diffusion_export_is_block_causal_in_transformers(transformers, tmp_path, extra):
    # config.block_size > 0 (objective=block): AutoModel applies the block-causal inference mask
    cfg = ModelConfig(**GQA, block_size=4, **extra)
    ours = random_model(cfg, seed=5)
    export = save_pretrained(ours.state_dict(), cfg, tmp_path / "export")
    assert json.loads((export / "config.json").read_text())["block_size"] == 4
    ids, mask = left_padded(3, 12, cfg.vocab_size, pads=[0, 4, 9])
    hf = transformers.AutoModel.from_pretrained(export, trust_remote_code=True)
    with torch.no_grad():
        ref = ours(ids)
        assert rel_err(ref, hf(ids).logits) < 1e-5
        assert rel_err(ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits) < 1e-5
        assert rel_err(ref, ours(ids, block_size=0)) > 1e-3  # not the bidirectional logits
        # block-causal: blocks 0-1 (positions < 8) do not see a change in block 2
        later = ids.clone()
        later[:, 9] = (later[:, 9] + 1) % cfg.vocab_size
        out = hf(later).logits
    rows = 9 if extra else 8  # shifted: row 8 holds position 7's prediction, still unchanged
    assert torch.equal(out[:, :rows], hf(ids).logits[:, :rows].detach())
    assert not torch.allclose(out[:, rows:], ref[:, rows:])


def test_hf_model_semantics(transformers, tmp_path):
    """Checks on the transformers model alone: bidirectional, padding hides keys only."""
    cfg = ModelConfig(**GQA)
    export = write_hf_files(save_pretrained(random_model(cfg).state_dict(), cfg, tmp_path / "e"))
    hf = transformers.AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    ids, mask = left_padded(2, 10, cfg.vocab_size, pads=[3, 0])
    changed = ids.clone()
    changed[0, :3] = torch.tensor([5, 6, 7])  # new tokens under the padding
    changed_last = ids.clone()
    changed_last[1, -1] = (ids[1, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a = hf(ids, attention_mask=mask).logits
        b = hf(changed, attention_mask=mask).logits
        c = hf(changed_last).logits
        plain = hf(ids).logits
    torch.testing.assert_close(a[0, 3:], b[0, 3:])  # real positions ignore padded tokens
    assert not torch.allclose(plain[1, 0], c[1, 0])  # position 0 sees the last token
    out = hf(ids, output_hidden_states=True)
    assert len(out.hidden_states) == cfg.n_layers + 1
    with pytest.raises(TypeError, match="labels"):
        hf(ids, labels=ids)
    # transformers' own save_pretrained keeps the layout: our loader reads it back
    hf.save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "resaved")(ids, mask), a)


def test_write_hf_files_keeps_every_field(tmp_path):
    cfg = ModelConfig(**GQA)
    export = save_pretrained(LLaDAModel(cfg).state_dict(), cfg, tmp_path / "e")
    before = json.loads((export / "config.json").read_text())
    write_hf_files(export)
    after = json.loads((export / "config.json").read_text())
    assert after == {**before, "auto_map": AUTO_MAP}
    for name in HF_FILES:
        assert (export / name).read_bytes() == (REPO / "llada_train" / "hf" / name).read_bytes()
    assert not [p.name for p in export.iterdir() if ".tmp" in p.name]  # atomic writes cleaned up
    # our own loader is unaffected by the additions
    assert load_pretrained(export).config == read_back(cfg)


def read_back(cfg: ModelConfig) -> ModelConfig:
    """What ``load_pretrained`` rebuilds: the released fields (runtime knobs at defaults)."""
    return ModelConfig.from_llada_json(cfg.to_llada_json())


def test_write_hf_files_needs_no_transformers(tmp_path):
    cfg = ModelConfig(**GQA)
    export = save_pretrained(LLaDAModel(cfg).state_dict(), cfg, tmp_path / "e")
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # any import of it now fails
        "from llada_train.hf import write_hf_files\n"
        f"write_hf_files({str(export)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert "auto_map" in json.loads((export / "config.json").read_text())


def test_write_hf_files_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(LladaError, match="config.json not found"):
        write_hf_files(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


# The released GSAI-ML/LLaDA-8B-* config.json at tiny size: the same keys (OLMo extras, their
# auto_map, bf16) with small numbers.
def released_config(cfg: ModelConfig) -> dict:
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
        "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": cfg.d_model, "embedding_dropout": 0.0, "embedding_size": cfg.vocab_size,
        "eos_token_id": cfg.eos_token_id, "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": cfg.mask_token_id, "max_sequence_length": cfg.max_sequence_length,
        "mlp_hidden_size": cfg.mlp_hidden_size, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers, "pad_token_id": cfg.pad_token_id, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": cfg.rms_norm_eps, "rope": True,
        "rope_full_precision": True, "rope_theta": cfg.rope_theta, "scale_logits": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": cfg.vocab_size, "weight_tying": False,
    }  # fmt: skip


def write_released_layout(cfg: ModelConfig, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """bf16 tensors in three ``model-0000i-of-00003.safetensors`` shards plus the index."""
    folder.mkdir()
    names = sorted(state)
    parts = [names[i::3] for i in range(3)]  # interleaved: every shard holds several blocks
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        fname = f"model-{i:05d}-of-00003.safetensors"
        save_file(
            {n: state[n].to(torch.bfloat16).contiguous() for n in part},
            folder / fname,
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * 2 for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(released_config(cfg), indent=2))
    return folder


def test_released_layout_loads_in_our_code(tmp_path):
    cfg = ModelConfig(**GQA)
    src = random_model(cfg, seed=3)
    folder = write_released_layout(cfg, src.state_dict(), tmp_path / "LLaDA-8B-Base")
    loaded = load_pretrained(folder)
    assert loaded.config == read_back(cfg)
    for name, p in loaded.state_dict().items():  # bf16 on disk -> fp32 exactly
        torch.testing.assert_close(
            p, src.state_dict()[name].to(torch.bfloat16).float(), rtol=0, atol=0
        )


def test_released_layout_loads_in_transformers_through_our_files(transformers, tmp_path):
    """The same folder, given our modeling files, loads shards + index with our logits."""
    cfg = ModelConfig(**GQA)
    folder = write_released_layout(cfg, random_model(cfg, seed=3).state_dict(), tmp_path / "r")
    ours = load_pretrained(folder)  # fp32 from bf16 shards
    write_hf_files(folder)
    hf_cfg = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert (hf_cfg.hidden_size, hf_cfg.num_key_value_heads, hf_cfg.embedding_size) == (32, 2, 40)
    assert (hf_cfg.mask_token_id, hf_cfg.pad_token_id, hf_cfg.eos_token_id) == (2, 1, 1)
    assert hf_cfg.bos_token_id is None  # the released config.json names no BOS
    assert hf_cfg.init_fn == "mitchell" and hf_cfg.alibi is False  # OLMo extras are kept
    hf = transformers.AutoModelForMaskedLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32
    )
    ids, mask = left_padded(2, 9, cfg.vocab_size, pads=[0, 5])
    with torch.no_grad():
        assert rel_err(ours(ids, mask), hf(ids, attention_mask=mask).logits) < 1e-5
