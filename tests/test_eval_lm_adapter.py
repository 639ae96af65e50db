"""The lm-eval adapter: its lm_eval-free core always, the registered harness model when installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llada_train.diffusion.likelihood import conditional_log_likelihood
from llada_train.errors import LladaError
from llada_train.eval.decode import HexConfig
from llada_train.eval.lm_eval_adapter import LLaDAHarness, build_harness_class
from llada_train.sample import generate
from tests.test_eval_cli import model_dir  # noqa: F401  (module-scoped fixture: tiny model folder)


def test_core_loglikelihood_and_generation(model_dir):  # noqa: F811
    core = LLaDAHarness(str(model_dir), mc_num="8", mc_batch_size="4", method="low_confidence",
                        gen_length="4", steps="4", block_length="4", batch_size="2", add_bos="false")
    assert core.decode_cfg.gen_length == 4 and core.source.add_bos is False
    pairs = [("what is 3 plus", " 4"), ("what is", " 2 plus 2")]
    got = core.loglikelihood_pairs(pairs, progress=False)
    model = core.bundle.model
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c, r = core._split(ctx, cont)
        assert len(r) == len(cont.split())  # whitespace word-level: one id per word
        single = conditional_log_likelihood(model, c, r, mask_token_id=2, generator=torch.Generator().manual_seed(0),
                                            n_samples=8, batch_size=4)
        if len(r) == 1:
            assert ll == pytest.approx(single, rel=1e-5)  # single token: exact, seed-independent
        assert ll < 0
        best = generate(model, torch.tensor([c]), len(r), len(r), mask_token_id=2).generated[0].tolist()
        assert greedy == (best == r)
    texts = core.generate_texts([("what is 3 plus 4", {"until": ["plus"]}), ("what", {"until": []})],
                                progress=False)
    assert len(texts) == 2 and "plus" not in texts[0]
    with pytest.raises(LladaError, match="unknown key"):
        LLaDAHarness(str(model_dir), no_such_arg="1")
    # method picks the decode config; its settings come converted, others are refused
    hexed = LLaDAHarness(str(model_dir), method="hex", gen_length="4", block_lengths="2;4",
                         tokens_per_step="1", cfg_scale="0.5", chat="false")
    assert type(hexed.decode_cfg) is HexConfig and hexed.decode_cfg.block_lengths == [2, 4]
    assert hexed.ll_cfg_scale == 0.5 and hexed.source.chat is False
    assert len(hexed.generate_texts([("what is 3", {"until": []})], progress=False)) == 1
    with pytest.raises(LladaError, match="unknown key 'steps' for method=med"):
        LLaDAHarness(str(model_dir), method="med", steps="4")
    with pytest.raises(LladaError, match="add_bos"):
        LLaDAHarness(str(model_dir), add_bos="maybe")


def test_registered_harness_model(model_dir):  # noqa: F811
    if importlib.util.find_spec("lm_eval") is None:
        with pytest.raises(LladaError, match="not installed"):
            build_harness_class()
        pytest.skip("lm_eval is not installed (optional extra 'eval'): the registered model is not tested")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    cls = build_harness_class()
    assert get_model("llada") is cls
    lm = cls.create_from_arg_string(f"model_path={model_dir},mc_num=4,gen_length=4,steps=4,block_length=4")
    req = Instance(request_type="loglikelihood", doc={}, arguments=("what is", " 3"), idx=0)
    ((ll, greedy),) = lm.loglikelihood([req])
    assert ll < 0 and isinstance(greedy, bool)
    gen = Instance(request_type="generate_until", doc={}, arguments=("what is", {"until": ["\n"]}), idx=0)
    assert isinstance(lm.generate_until([gen])[0], str)
