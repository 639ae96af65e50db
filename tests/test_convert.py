"""llada-convert: tiny random Llama/Qwen2 models built with transformers, converted and checked
against transformers' own forward (offline: nothing is downloaded). The per-family parity cases
(Llama, Llama 3.x rope scaling, Qwen2, Qwen3, Mistral) are in test_convert_families.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llada_train.cli.convert import convert, main  # noqa: E402
from llada_train.diffusion import ObjectiveConfig, PretrainObjective  # noqa: E402
from llada_train.model import LLaDAModel, load_pretrained  # noqa: E402
from llada_train.model.adapters import LlamaAdapter, Qwen2Adapter  # noqa: E402

V = 64
SHAPE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    vocab_size=V,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
)


def hf_model(family: str, tied: bool, **kw):
    if family == "llama":
        cfg = transformers.LlamaConfig(**SHAPE, rope_theta=5000.0, tie_word_embeddings=tied, **kw)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**SHAPE, rope_theta=20000.0, tie_word_embeddings=tied, **kw)
        model = transformers.Qwen2ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor random (norms and biases too): a swapped name shows
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def save_hf(tmp_path, family: str, tied: bool, **save_kw):
    model = hf_model(family, tied)
    src = tmp_path / f"{family}_{'tied' if tied else 'untied'}"
    model.save_pretrained(src, **save_kw)
    return model, src


def ours_causal(folder) -> LLaDAModel:
    """The export, loaded by our loader, with causal attention switched on (parity check)."""
    model = load_pretrained(folder)
    twin = LLaDAModel(dataclasses.replace(model.config, causal=True))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_sharded_checkpoint_and_cli(tmp_path, capsys):
    ref_model, src = save_hf(tmp_path, "llama", False, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    main(["--from", str(src), "--out", str(tmp_path / "out"), "--family", "llama"])
    assert "converted llama" in capsys.readouterr().out
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours_causal(tmp_path / "out")(ids)[..., :V], ref_model(ids).logits) < 1e-5


def test_adapter_round_trip_names():
    model = hf_model("qwen2", tied=False)
    hf = model.state_dict()
    adapter = Qwen2Adapter()
    back = adapter.from_ours(adapter.to_ours(hf, tied=False))
    assert set(back) == set(hf) and all(back[k] is hf[k] for k in hf)
    assert "model.transformer.blocks.1.k_proj.bias" in adapter.to_ours(hf, tied=False)
    tied = LlamaAdapter().to_ours(hf_model("llama", tied=True).state_dict(), tied=True)
    head, emb = tied["model.transformer.ff_out.weight"], tied["model.transformer.wte.weight"]
    assert torch.equal(head, emb) and head.data_ptr() != emb.data_ptr()  # untied copy


def write_tokenizer(folder, n: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("n_tokens,grown", [(60, 0), (V, 1)])
def test_mask_token_added_with_mean_rows(tmp_path, n_tokens, grown):
    ref_model, src = save_hf(tmp_path, "qwen2", True)
    write_tokenizer(src, n_tokens)
    result = convert(src, tmp_path / "out")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(result.out / "tokenizer.json"))
    mask_id = tok.token_to_id("<|mdm_mask|>")
    assert mask_id == n_tokens == result.config.mask_token_id and result.grown_rows == grown
    wte = load_pretrained(result.out).transformer.wte.weight.detach()
    emb = ref_model.model.embed_tokens.weight.detach()  # (V, d), the source rows
    assert wte.shape[0] == V + grown
    torch.testing.assert_close(wte[mask_id], emb.mean(0))  # the mean of the source rows
    keep = [i for i in range(V) if i != mask_id]
    assert torch.equal(wte[keep], emb[keep])  # every other row untouched
    again = convert(src, tmp_path / "out2", mask_token="w5")
    assert again.config.mask_token_id == 5 and not again.mask_added  # existing token reused


def test_shift_logits_reuses_the_ar_head(tmp_path):
    ref_model, src = save_hf(tmp_path, "llama", False)
    result = convert(src, tmp_path / "out", shift_logits=True)
    assert json.loads((result.out / "config.json").read_text())["shift_logits"] is True
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_model(ids).logits
        ours = ours_causal(result.out)(ids)[..., :V]
    assert rel_err(ours[:, 1:], ref[:, :-1]) < 1e-5  # row i holds the prediction of token i


def test_diffusion_training_from_converted_init_lowers_loss(tmp_path):
    _, src = save_hf(tmp_path, "qwen2", False)
    model = load_pretrained(convert(src, tmp_path / "out").out).train()
    obj = PretrainObjective(ObjectiveConfig(var_len_prob=0.0), model.config.mask_token_id)
    rows = (torch.arange(16)[None, :] + torch.arange(4)[:, None]) % 10 + 2  # learnable pattern
    batch = {"input_ids": rows}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return (
                sum(
                    obj(model, batch, torch.Generator().manual_seed(s)).loss.item()
                    for s in range(8)
                )
                / 8
            )

    before = eval_loss()
    for step in range(30):
        loss = obj(model, batch, torch.Generator().manual_seed(100 + step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"diffusion loss from the converted init: {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before


def refused(tmp_path, capsys, src, match: str) -> None:
    out = tmp_path / "refused_out"
    capsys.readouterr()  # drop transformers' save progress bars
    with pytest.raises(SystemExit) as exc:
        main(["--from", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_unsupported_inputs_are_refused_with_one_line(tmp_path, capsys):
    _, src = save_hf(tmp_path, "llama", False)
    cfg_path = src / "config.json"
    original = json.loads(cfg_path.read_text())

    def write(**changes):
        cfg_path.write_text(json.dumps({**original, **changes}))

    write(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    refused(tmp_path, capsys, src, "model_type='gpt2'")
    write(rope_parameters={"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0})
    refused(tmp_path, capsys, src, "rope type 'longrope' is not implemented")
    write(intermediate_size=40)
    refused(tmp_path, capsys, src, "has shape (48, 32) but config.json implies (40, 32)")
    write(attention_bias=True)
    refused(tmp_path, capsys, src, "attention_bias=true")
    write(model_type="qwen2", use_sliding_window=True)
    refused(tmp_path, capsys, src, "use_sliding_window=true")


def test_qkv_bias_flag_adds_only_qkv_biases_initialised_to_zero(tmp_path):
    from llada_train.model import ModelConfig, count_parameters, save_pretrained

    base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=V)
    plain, biased = ModelConfig(**base), ModelConfig(**base, include_qkv_bias=True)
    head_dim = 8
    assert count_parameters(biased) - count_parameters(plain) == 2 * (4 + 2 + 2) * head_dim
    model = LLaDAModel(biased)
    model.init_weights(torch.Generator().manual_seed(0))
    biases = {k: v for k, v in model.state_dict().items() if k.endswith(".bias")}
    assert len(biases) == 6 and all(
        k.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for k in biases
    )
    assert all(not v.any() for v in biases.values())
    out = save_pretrained(model.state_dict(), biased, tmp_path / "b")
    assert json.loads((out / "config.json").read_text())["include_qkv_bias"] is True
    assert load_pretrained(out).config.include_qkv_bias
