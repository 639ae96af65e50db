"""llada-convert per model family: tiny random models built with transformers' own classes
(Llama, Llama 3.x rope scaling, Qwen2, Qwen3, Mistral), converted once each and checked
against transformers' forward (causal), against the export's AutoModel (diffusion) and by a
training step. Offline: nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llada_train.cli.convert import convert, main  # noqa: E402
from llada_train.diffusion import ObjectiveConfig, PretrainObjective  # noqa: E402
from llada_train.diffusion.block import BlockObjective  # noqa: E402
from llada_train.model import LLaDAModel, ModelConfig, load_pretrained, read_config  # noqa: E402
from llada_train.model.adapters.base import rope_settings  # noqa: E402
from llada_train.model.layers import rope_inv_freq  # noqa: E402
from llada_train.model.lora import PeftConfig, apply_lora  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 64
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6,
             bos_token_id=0, eos_token_id=1)  # fmt: skip
# Llama 3.1's rope_scaling, its original length cut to 512 so that a head of 8 has a high
# (kept), a medium (blended) and low (divided) frequencies: wavelengths 6, 167, 4443, 1.2e5
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}  # fmt: skip
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

# case -> (transformers config class, model class, config kwargs)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5000.0)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_theta5e5": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5e5)),
    "llama3_scaling": ("LlamaConfig", "LlamaForCausalLM",
                       dict(rope_parameters={**LLAMA3, "rope_theta": 5e5})),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})),
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_parameters={**YARN, "rope_theta": 1e4})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=20000.0)),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM",
                        dict(rope_theta=20000.0, tie_word_embeddings=True)),
    # head_dim 12 != hidden 32 / 4 heads, as in Qwen3 (1024 / 16 heads with head_dim 128)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=12, rope_theta=1e6, tie_word_embeddings=True)),
    # Mistral Nemo-style explicit head_dim; a window as long as max_position_embeddings is inert
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(head_dim=16, sliding_window=64, rope_theta=1e6)),
}  # fmt: skip


def hf_model(case: str):
    """A tiny transformers model with every tensor random (norms and biases too)."""
    config_cls, model_cls, kw = CASES[case]
    kw = {"tie_word_embeddings": False, **kw}
    if case.startswith("qwen2"):
        kw["use_sliding_window"] = False
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**SHAPE, **kw))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a swapped or dropped name shows
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    """(case, the transformers model, its saved folder, our diffusion export): one per case."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    model = hf_model(case)
    model.save_pretrained(root / "hf")
    result = convert(root / "hf", root / "export")
    return case, model, root / "hf", result


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ids(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(seed))


def test_config_carries_the_family_features(converted):
    case, ref, _, result = converted
    cfg = read_config(result.out)
    assert cfg == result.config and cfg.causal is False  # diffusion training by default
    assert cfg.vocab_size == V + 1 and cfg.mask_token_id == V  # no tokenizer: a new last row
    assert cfg.n_kv_heads == 2 and result.tied is ref.config.tie_word_embeddings
    assert cfg.include_qkv_bias is case.startswith("qwen2")
    assert cfg.qk_norm is (case == "qwen3")
    assert cfg.head_dim == {"qwen3": 12, "mistral": 16}.get(case, 8)
    assert cfg.rope_theta == ref.config.rope_parameters["rope_theta"]
    kind = ref.config.rope_parameters["rope_type"]
    assert (cfg.rope_scaling_params or {}).get("rope_type", "default") == kind


def test_causal_export_reproduces_transformers_logits(converted):
    case, ref, _, result = converted
    model = load_pretrained(result.out)
    twin = LLaDAModel(dataclasses.replace(model.config, causal=True))
    twin.load_state_dict(model.state_dict())
    x = ids()
    with torch.no_grad():
        err = rel_err(twin.eval()(x)[..., :V], ref(x).logits)
    print(f"{case}: causal export vs transformers, relative error {err:.2e}")
    assert err < 1e-5


def test_diffusion_export_loads_in_automodel_with_our_logits(converted):
    case, _, _, result = converted
    hf, info = transformers.AutoModel.from_pretrained(
        result.out, trust_remote_code=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_pretrained(result.out).eval()
    x = ids(10, seed=2)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in one row
    with torch.no_grad():
        err = rel_err(hf.eval()(x, attention_mask=mask).logits, ours(x, mask))
    print(f"{case}: AutoModel diffusion export vs ours, relative error {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("mode", ["full", "lora", "block"])
def test_one_training_step(converted, mode):
    case, _, _, result = converted
    model = load_pretrained(result.out).train()
    mask_id = model.config.mask_token_id
    if mode == "block":
        objective = BlockObjective(ObjectiveConfig(name="block", block_size=4), mask_id, 1)
    else:
        objective = PretrainObjective(ObjectiveConfig(var_len_prob=0.0), mask_id)
    if mode == "lora":
        apply_lora(model, PeftConfig(method="lora", r=4), str(result.out), seed=0)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.AdamW(trained.values(), lr=1e-3)
    loss = objective(model, {"input_ids": ids(16, seed=3)}, torch.Generator().manual_seed(4)).loss
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    lora_b = [n for n in trained if "lora_B" in n]  # B starts at 0: A's gradient is 0 at step 1
    moved = lora_b if mode == "lora" else list(trained)
    assert all(trained[n].grad is not None and torch.isfinite(trained[n].grad).all() for n in moved)
    opt.step()
    unchanged = [n for n in moved if torch.equal(trained[n], before[n])]
    assert not unchanged, unchanged[:3]
    if case == "qwen3" and mode == "full":
        assert trained["model.transformer.blocks.0.q_norm.weight"].grad.abs().sum() > 0


# ---- RoPE scaling: our inverse frequencies against transformers' ROPE_INIT_FUNCTIONS ------
ROPE_REFERENCE = {
    # Llama 3.1 / 3.2 as released: head 128, theta 5e5
    "llama3": {**LLAMA3, "original_max_position_embeddings": 8192, "rope_theta": 5e5},
    "linear": dict(rope_type="linear", factor=4.0, rope_theta=1e4),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096,
                 rope_theta=1e6),  # Qwen2.5/Qwen3 long-context recipe
    "yarn_mscale": dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                        mscale=1.0, mscale_all_dim=0.707, beta_fast=32, beta_slow=1,
                        truncate=False, rope_theta=1e4),  # DeepSeek-V3 style
    "yarn_attention_factor": dict(rope_type="yarn", factor=2.0, attention_factor=1.5,
                                  original_max_position_embeddings=2048, rope_theta=1e4),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ROPE_REFERENCE))
def test_rope_scaling_matches_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(ROPE_REFERENCE[name])
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32,
                                   max_position_embeddings=131072, rope_parameters=params)  # fmt: skip
    hf_json = json.loads(cfg.to_json_string())  # what save_pretrained writes
    theta, scaling = rope_settings(hf_json, "config.json")
    ours, ours_factor = rope_inv_freq(128, theta, scaling)
    ref, ref_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert ours_factor == pytest.approx(ref_factor, rel=1e-12)


def test_rope_scaling_by_hand():
    """Entries worked out from the formulas, independently of both implementations."""
    theta, hd = 5e5, 128

    def base(i: int) -> float:  # plain RoPE frequency of pair i
        return theta ** (-2 * i / hd)

    inv, _ = rope_inv_freq(hd, theta, {**LLAMA3, "original_max_position_embeddings": 8192})
    # wavelengths: pair 10 ~ 40 (< 8192/4: kept), pair 50 ~ 1.8e5 (> 8192: divided by 8),
    # pair 30 ~ 2936 (between: blended with smooth = (8192 / wavelength - 1) / (4 - 1))
    smooth = (8192 / (2 * math.pi / base(30)) - 1) / 3
    assert 0 < smooth < 1
    for i, expected in ((10, base(10)), (50, base(50) / 8),
                        (30, (1 - smooth) * base(30) / 8 + smooth * base(30))):  # fmt: skip
        assert inv[i].item() == pytest.approx(expected, rel=1e-6)
    inv, _ = rope_inv_freq(hd, theta, {"rope_type": "linear", "factor": 4.0})
    assert inv[7].item() == pytest.approx(base(7) / 4, rel=1e-6)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": 1.25}  # fmt: skip
    inv, factor = rope_inv_freq(hd, theta, yarn)
    # the fastest pairs (> 32 turns over 4096 positions) keep their frequency, the slowest
    # (< 1 turn) are divided by the factor; cos/sin carry attention_factor
    assert inv[0].item() == 1.0 and inv[63].item() == pytest.approx(base(63) / 4, rel=1e-6)
    assert factor == 1.25
    _, scaling = rope_settings({"rope_scaling": {k: v for k, v in yarn.items()
                                                 if k != "attention_factor"},
                                "max_position_embeddings": 16384}, "c")  # fmt: skip
    assert scaling["attention_factor"] == pytest.approx(0.1 * math.log(4.0) + 1.0)  # YaRN's


def test_transformers_4x_config_reads_like_5x():
    """Hub checkpoints carry ``rope_theta`` and ``rope_scaling`` (4.x keys), not rope_parameters."""
    v5 = json.loads(transformers.LlamaConfig(**SHAPE, rope_parameters={**LLAMA3, "rope_theta": 5e5})
                    .to_json_string())  # fmt: skip
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    assert rope_settings(v4, "c") == rope_settings(v5, "c")
    assert rope_settings(v4, "c")[1]["original_max_position_embeddings"] == 512


def test_old_configs_without_the_new_fields_load_as_before():
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, vocab_size=V)
    data = cfg.to_llada_json()
    assert data["head_dim"] == 8 and ModelConfig.from_llada_json(data) == cfg
    for key in ("head_dim", "qk_norm", "rope_scaling_params"):
        del data[key]
    old = ModelConfig.from_llada_json(data)
    assert old == cfg and old.head_dim_override == 0 and old.rope_scaling_params == {}
    wide = dataclasses.replace(cfg, head_dim_override=12, qk_norm=True)
    assert ModelConfig.from_llada_json(wide.to_llada_json()) == wide
    from llada_train.hf.configuration_llada import LLaDAConfig

    hf_old = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2)  # an export's config, no new keys
    assert hf_old.head_dim == 8 and not hf_old.qk_norm and hf_old.rope_scaling_params is None


def refused(tmp_path: Path, capsys, src: Path, match: str) -> None:
    out = tmp_path / "refused_out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--from", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_what_we_cannot_compute_is_refused_with_one_line(tmp_path, capsys):
    src = tmp_path / "hf"
    hf_model("llama").save_pretrained(src)
    cfg_path = src / "config.json"
    original = json.loads(cfg_path.read_text())

    def write(**changes):
        cfg_path.write_text(json.dumps({**original, **changes}))

    write(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    refused(tmp_path, capsys, src, "rope type 'dynamic' (dynamic NTK)")
    write(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    refused(tmp_path, capsys, src, "rope type 'longrope' is not implemented")
    write(rope_scaling={"rope_type": "llama3", "factor": 8.0}, rope_parameters=None)
    refused(tmp_path, capsys, src, "needs ['low_freq_factor', 'high_freq_factor']")
    write(partial_rotary_factor=0.5)
    refused(tmp_path, capsys, src, "partial_rotary_factor=0.5 is not implemented")
    write(model_type="mistral", sliding_window=16)
    refused(tmp_path, capsys, src, "sliding_window=16 < max_position_embeddings=64")
    write(model_type="qwen3", use_sliding_window=True)
    refused(tmp_path, capsys, src, "use_sliding_window=true")
    write(model_type="qwen3", attention_bias=True)
    refused(tmp_path, capsys, src, "attention_bias=true")
    shutil.rmtree(src)


def test_converted_qwen3_with_yarn_trains_through_llada_pretrain(demo_data, tmp_path):
    """The real entry point from a converted export (q/k norm, explicit head_dim, yarn): two
    steps, and the run's export keeps every family field."""
    from tests.launch_utils import cli, metrics

    shape = {**SHAPE, "vocab_size": 512}  # the demo tokenizer's (mask token included)
    rope = {**YARN, "rope_theta": 1e6}
    model = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**shape, head_dim=12, rope_parameters=rope)
    )
    model.save_pretrained(tmp_path / "hf")
    shutil.copy2(demo_data / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    result = convert(tmp_path / "hf", tmp_path / "init")
    assert not result.mask_added and result.config.vocab_size == 512
    run_dir = tmp_path / "run"
    cli("llada-pretrain", [
        f"run_dir={run_dir}", f"init_from={result.out}", f"data.path={demo_data / 'shards'}",
        f"data.tokenizer={demo_data / 'tokenizer.json'}", "trainer.max_steps=2",
        "trainer.seq_len=64", "logging.log_every=1", "logging.progress_bar=false",
    ])  # fmt: skip
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    trained = read_config(run_dir / "export")
    assert trained.qk_norm and trained.head_dim == 12
    assert trained.rope_scaling_params == result.config.rope_scaling_params
    assert trained.rope_scaling_params["rope_type"] == "yarn"
