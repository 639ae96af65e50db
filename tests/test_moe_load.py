"""The released MoE layouts load: tiny fixtures written in LLaDA2's and LLaDA-MoE's own
names (fused q/k/v, one tensor per expert, sharded with an index) through ``llada-convert``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llada_train.cli.convert import convert
from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, load_pretrained
from llada_train.model.adapters import LLaDA2MoeAdapter, LLaDAMoEAdapter, adapter_for
from llada_train.model.adapters.base import OURS

V = 96
COMMON = dict(
    vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=1,
    eos_token_id=1, bos_token_id=0, tie_word_embeddings=False, hidden_act="silu",
    num_experts=8, num_experts_per_tok=2,
)  # fmt: skip
# config.json fields as the released LLaDA2.0 and LLaDA-MoE files spell them
LLADA2 = dict(
    COMMON, model_type="llada2_moe", intermediate_size=96, head_dim=16, use_qkv_bias=False,
    use_qk_norm=True, use_bias=False, rope_theta=10000.0, num_shared_experts=1, n_group=4,
    topk_group=2, routed_scaling_factor=2.5, moe_intermediate_size=32, first_k_dense_replace=1,
    partial_rotary_factor=0.5,
)  # fmt: skip
LLADAMOE = dict(
    COMMON, model_type="llada", dense_intermediate_size=96, expert_intermediate_size=32,
    shared_expert_intermediate_size=48, rope_theta=50000.0, partial_rotary_factor=1.0,
    qk_layernorm=True, moe_layer_freq=[0, 1, 1], moe_router_enable_expert_bias=True,
    moe_router_score_function="softmax", norm_topk_prob=False,
)  # fmt: skip
ADAPTERS = {"llada2": (LLADA2, LLaDA2MoeAdapter), "lladamoe": (LLADAMOE, LLaDAMoEAdapter)}


def released_folder(tmp: Path, kind: str, per_expert: bool = True) -> tuple[Path, LLaDAModel]:
    """A random model of ``kind`` written in the released layout: config.json and two
    safetensors shards with an index. Returns the folder and our model of the same weights."""
    hf_cfg, adapter_cls = ADAPTERS[kind]
    adapter = adapter_cls("fixture", per_expert=per_expert)
    model = LLaDAModel(adapter.model_config(hf_cfg))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, b in model.named_buffers():  # the expert biases are fp32 buffers
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    released = adapter.from_ours({n: t.clone() for n, t in model.state_dict().items()})
    folder = tmp / f"{kind}_released"
    folder.mkdir()
    names = sorted(released)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for fname, part in shards.items():
        save_file({n: released[n].contiguous() for n in part}, folder / fname)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    return folder, model.eval()


def test_released_names_are_the_released_ones(tmp_path):
    folder, _ = released_folder(tmp_path, "llada2")
    names = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    layer1 = "model.layers.1."
    assert layer1 + "attention.query_key_value.weight" in names
    assert (
        layer1 + "mlp.experts.7.down_proj.weight" in names
        and layer1 + "mlp.gate.expert_bias" in names
    )
    assert layer1 + "mlp.shared_experts.gate_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace=1


def test_fused_qkv_rows_are_q_heads_then_k_then_v():
    adapter = LLaDA2MoeAdapter("hand")
    cfg = adapter.model_config({**LLADA2, "num_hidden_layers": 1, "num_experts": 0})
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim  # 64 and 32 rows
    fused = torch.arange(q + 2 * kv, dtype=torch.float32)[:, None].expand(-1, 64)  # row r = r
    ours = adapter.to_ours({"model.layers.0.attention.query_key_value.weight": fused}, tied=False)
    block = OURS + "blocks.0."
    assert ours[block + "q_proj.weight"][:, 0].tolist() == list(range(q))
    assert ours[block + "k_proj.weight"][:, 0].tolist() == list(range(q, q + kv))
    assert ours[block + "v_proj.weight"][:, 0].tolist() == list(range(q + kv, q + 2 * kv))


@pytest.mark.parametrize(
    ("kind", "per_expert"), [("llada2", True), ("llada2", False), ("lladamoe", True)]
)
def test_released_layout_converts_and_gives_the_same_logits(tmp_path, kind, per_expert):
    folder, model = released_folder(tmp_path, kind, per_expert)
    result = convert(folder, tmp_path / "export")
    assert result.family == ("llada2_moe" if kind == "llada2" else "lladamoe")
    ours = load_pretrained(tmp_path / "export")
    assert ours.config.num_experts == 8 and ours.config.qk_norm
    ids = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        want, got = model(ids, mask), ours(ids, mask)[..., :V]  # convert adds a mask row
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_lladamoe_is_found_by_its_fields_not_its_model_type():
    assert isinstance(adapter_for(LLADAMOE, "auto", "config.json"), LLaDAMoEAdapter)
    assert LLADAMOE["model_type"] == "llada"  # what the Hub config ships


def test_expert_tensors_that_do_not_match_the_config_are_one_line_errors(tmp_path):
    folder, _ = released_folder(tmp_path, "llada2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_experts": 16, "n_group": 4}))
    with pytest.raises(LladaError, match="holds 8 experts .* num_experts=16"):
        convert(folder, tmp_path / "export")
    (folder / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 16}))
    with pytest.raises(
        LladaError,
        match=r"moe\.gate_proj has shape \(8, 32, 64\) but config.json implies \(8, 16, 64\)",
    ):
        convert(folder, tmp_path / "export")
    assert not (tmp_path / "export").exists()  # nothing written on an error
