"""LoRA with peft, in process: trainable count by hand, merge = base + B @ A * alpha / r by hand,
adapter folders for generate/eval/export, refusals with one line and nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, load_pretrained, lora, save_pretrained
from llada_train.model.config import ModelConfig
from llada_train.train.optim import param_groups

pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=96, vocab_size=128,
                max_sequence_length=64, bos_token_id=0, eos_token_id=1, pad_token_id=1, mask_token_id=2)
    return ModelConfig(**{**base, **kw})


def make_base(path, cfg: ModelConfig | None = None, seed: int = 0):
    cfg = cfg or tiny_cfg()
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # norms away from 1, so fingerprints tell bases apart
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return save_pretrained(dict(model.named_parameters()), cfg, path)


def lora_model(base, targets=ALL, r=4, alpha=8.0):
    model = load_pretrained(base)
    lora.apply_lora(model, lora.PeftConfig("lora", r, alpha, 0.0, list(targets)), str(base), seed=0)
    return model


def hand_count(cfg: ModelConfig, r: int, names, head: bool = False) -> int:
    d, hd, mlp = cfg.d_model, cfg.head_dim, cfg.mlp_hidden_size
    in_out = {"q_proj": (d, cfg.n_heads * hd), "k_proj": (d, cfg.n_kv_heads * hd),
              "v_proj": (d, cfg.n_kv_heads * hd), "attn_out": (cfg.n_heads * hd, d),
              "ff_proj": (d, mlp), "up_proj": (d, mlp), "ff_out": (mlp, d)}
    total = cfg.n_layers * sum(r * sum(in_out[n]) for n in names)
    return total + (r * (d + cfg.vocab_size) if head else 0)


def test_trainable_parameters_are_the_adapters_and_count_by_hand(tmp_path):
    base = make_base(tmp_path / "base")
    cfg = tiny_cfg()
    model = lora_model(base, r=4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == hand_count(cfg, 4, ALL)
    # ff_out is the MLP down projection only; the head is opt-in by its full name
    assert type(model.transformer.ff_out) is torch.nn.Linear
    with_head = lora_model(base, targets=["q_proj", "model.transformer.ff_out"], r=2)
    n = sum(p.numel() for p in with_head.parameters() if p.requires_grad)
    assert n == hand_count(cfg, 2, ["q_proj"], head=True)
    # only trainable parameters reach the optimizer
    groups = param_groups(model, 0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == hand_count(cfg, 4, ALL)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable fraction (r=4, all 7 block Linears): {hand_count(cfg, 4, ALL) / total:.4f}")


def test_fresh_adapters_keep_the_forward_and_its_modules(tmp_path):
    base = make_base(tmp_path / "base")
    ref, model = load_pretrained(base), lora_model(base)
    x = torch.tensor([[3, 4, 5, 2, 2, 7]])
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # B starts at zero
        hidden = model(x, return_hidden=True)
        t = model.transformer
        assert torch.allclose(t.ff_out(t.ln_f(hidden)), ref(x), atol=1e-6)


def _random_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _saved_adapter(tmp_path, base, targets=ALL, r=4, alpha=8.0):
    model = lora_model(base, targets, r, alpha)
    _random_adapter(model)
    state = lora.adapter_state(dict(model.named_parameters()))
    return lora.save_adapter(state, lora.live_config(model), tmp_path / "adapter"), model


def test_merged_export_equals_base_plus_delta_by_hand(tmp_path):
    from llada_train.cli.export import main

    base = make_base(tmp_path / "base")
    folder, live = _saved_adapter(tmp_path, base, targets=["q_proj", "ff_out", "model.transformer.ff_out"])
    main(["--adapter", str(folder), "--merge-lora", "--out", str(tmp_path / "merged")])
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    ab = load_file(folder / "adapter_model.safetensors")
    conf = json.loads((folder / "adapter_config.json").read_text())
    scaling = conf["lora_alpha"] / conf["r"]
    assert set(merged) == set(base_w) and not any("lora" in k for k in merged)
    changed = 0
    for name, w in base_w.items():
        module = name.removesuffix(".weight")
        a_key = f"{lora.PEFT_PREFIX}{module}.lora_A.weight"
        expected = w + ab[f"{lora.PEFT_PREFIX}{module}.lora_B.weight"] @ ab[a_key] * scaling if a_key in ab else w
        changed += a_key in ab
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert changed == 2 * 2 + 1  # q_proj and ff_out in 2 blocks, and the head
    # the merged model computes what the live LoRA model computes
    x = torch.tensor([[3, 4, 2, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "merged")(x), live(x), rtol=1e-4, atol=1e-5)


def test_generate_and_eval_loading_accept_an_adapter_folder(tmp_path):
    from llada_train.eval.config import ModelSourceConfig
    from llada_train.eval.loading import _load_model

    base = make_base(tmp_path / "base")
    folder, live = _saved_adapter(tmp_path, base)
    (folder / "tokenizer.json").write_text("{}")  # shipped with the adapter: used as tokenizer
    model, tokenizer = _load_model(ModelSourceConfig(model_path=str(folder)))
    assert tokenizer == str(folder)
    assert not any("lora" in n for n, _ in model.named_parameters())
    x = torch.tensor([[3, 4, 2, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), live(x), rtol=1e-4, atol=1e-5)
    # model_path=<base> adapter=<folder> (a ModelSourceConfig field once the eval config has it)
    cfg = ModelSourceConfig(model_path=str(base))
    cfg.adapter = str(folder)
    with torch.no_grad():
        torch.testing.assert_close(_load_model(cfg)[0](x), live(x), rtol=1e-4, atol=1e-5)
    cfg.model_path = str(make_base(tmp_path / "other", seed=3))
    with pytest.raises(LladaError, match="trained on another base"):
        _load_model(cfg)


def test_unknown_target_is_refused_with_one_line(tmp_path):
    base = make_base(tmp_path / "base")
    with pytest.raises(LladaError, match="'qproj' matches no Linear module") as err:
        lora_model(base, targets=["q_proj", "qproj"])
    assert "\n" not in str(err.value)
    with pytest.raises(LladaError, match="also matches model.transformer.blocks.0.attn_norm"):
        lora_model(base, targets=[r"model\.transformer\.blocks\.0\..*"])
    with pytest.raises(LladaError, match="need r >= 1"):
        lora_model(base, r=0)
    with pytest.raises(LladaError, match="needs init_from"):
        lora.apply_lora(load_pretrained(base), lora.PeftConfig("lora"), None, 0)
    with pytest.raises(LladaError, match="peft.method='qlora'"):
        lora.lora_enabled(lora.PeftConfig("qlora"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_an_adapter_for_another_base_is_refused_and_nothing_written(tmp_path, capsys):
    from llada_train.cli.export import main

    base = make_base(tmp_path / "base")
    folder, _ = _saved_adapter(tmp_path, base)
    same_shape = make_base(tmp_path / "other", seed=5)
    other_arch = make_base(tmp_path / "wide", tiny_cfg(d_model=96, n_heads=4, n_kv_heads=4))
    for other in (same_shape, other_arch):
        out = tmp_path / f"out_{other.name}"
        with pytest.raises(SystemExit) as exit_info:
            main(["--adapter", str(folder), "--merge-lora", "--base", str(other), "--out", str(out)])
        assert exit_info.value.code == 2
        assert "trained on another base" in _one_line(capsys)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
    # fingerprint off: the shape check still refuses the other architecture
    (folder / lora.ADAPTER_INFO).unlink()
    with pytest.raises(LladaError, match="made for another model"):
        lora.load_merged(other_arch, lora.read_adapter(folder))


def test_merge_lora_on_a_full_run_is_refused(tmp_path, capsys):
    from omegaconf import OmegaConf

    from llada_train.cli.export import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = {"model": {k: v for k, v in vars(tiny_cfg()).items() if not k.startswith("_")},
           "init_from": None, "data": {"tokenizer": None}, "peft": {"method": "none"}}
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")
    with pytest.raises(SystemExit):
        main(["--run-dir", str(run_dir), "--merge-lora", "--out", str(tmp_path / "out")])
    assert "not a LoRA run" in _one_line(capsys) and not (tmp_path / "out").exists()


def test_resume_refuses_other_adapters_or_a_full_checkpoint(tmp_path):
    from llada_train.atomic import write_json_atomic
    from llada_train.train.checkpointing import LORA_STATE, _check_lora_matches

    base = make_base(tmp_path / "base")
    step = tmp_path / "step"
    step.mkdir()
    write_json_atomic(step / LORA_STATE, lora.signature(lora_model(base, r=4)))
    assert _check_lora_matches(lora_model(base, r=4), step)
    with pytest.raises(LladaError, match=r"r=4 alpha=8.0 but this run has peft=lora r=8 .*differing: r\)"):
        _check_lora_matches(lora_model(base, r=8), step)
    with pytest.raises(LladaError, match="but this run has peft=none"):
        _check_lora_matches(load_pretrained(base), step)
    (step / LORA_STATE).unlink()
    with pytest.raises(LladaError, match="written with peft=none but this run has peft=lora"):
        _check_lora_matches(lora_model(base, r=4), step)


def test_adapter_folder_loads_in_stock_peft_on_the_transformers_export(tmp_path):
    """Interop: the adapter folder is peft's own layout, so ``PeftModel.from_pretrained`` puts it
    on the base loaded by transformers (``trust_remote_code``) with the same logits."""
    pytest.importorskip("transformers")
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    base = make_base(tmp_path / "base")
    folder, live = _saved_adapter(tmp_path, base)
    hf = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(base, trust_remote_code=True), folder)
    x = torch.tensor([[3, 4, 2, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, live(x), rtol=1e-4, atol=1e-5)
