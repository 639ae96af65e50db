"""The decode registry: every entry runs its own sampler with its own settings, strictly."""

from __future__ import annotations

import pytest
import torch

from llada_train.errors import LladaError
from llada_train.eval import TextCodec, get_extractor
from llada_train.eval.decode import DECODERS, DecodeConfig, decode_batch, decode_config
from llada_train.model import load_pretrained
from llada_train.sample import (
    fast_generate,
    generate,
    hex_generate,
    infill_generate,
    left_pad,
    med_generate,
    tolerator_generate,
)
from llada_train.sample.block import block_generate
from tests.conftest import REPO
from tests.test_eval_cli import model_dir  # noqa: F401  (module-scoped fixture: tiny model folder)

MASK = 2
# EOS/EoT as the samplers see them: words this random model predicts often ("4", "what"), so
# forbid_eos / eos_zero_confidence / the EoT penalty change its output
EOS, EOT = 13, 3
G = 8  # gen_length
# small, non-default settings per method: a registry entry that ignored or misrouted one
# of them would decode differently from the direct call below
SETTINGS = {
    "low_confidence": dict(steps=4, block_length=4, cfg_scale=0.5, eos_zero_confidence=True),
    "random": dict(steps=6, block_length=8, temperature=0.7),
    "med": dict(block_length=4, entropy_threshold=0.9, forbid_eos=True),
    "threshold": dict(block_length=4, threshold=0.3, temperature=0.5),
    "hex": dict(block_lengths=[2, 4], tokens_per_step=1, eos_zero_confidence=True),
    "tolerator": dict(budget=6, rho=0.7, gamma_start=0.5, block_length=8),
    "infill": dict(answer_length=2, delimiter="####", entropy_threshold=5.0),
    "block": dict(block_size=4, steps=2, threshold=0.3, minimal_topk=2, use_cache=False),
}


def direct(name: str, model, ids, attn, codec, gen):
    """What ``name`` must compute with ``SETTINGS[name]``: its sampler called by hand."""
    kw = dict(mask_token_id=MASK, attention_mask=attn, generator=gen)
    ext = get_extractor("gsm8k")
    if name in ("low_confidence", "random"):
        temp = 0.7 if name == "random" else 0.0
        steps, block = (4, 4) if name == "low_confidence" else (6, 8)
        extra = dict(cfg_scale=0.5, eos_zero_confidence=True) if name == "low_confidence" else {}
        out = generate(model, ids, G, steps, block, temp, name, eos_token_id=EOS, eot_token_id=EOT,
                       **extra, **kw)
    elif name == "med":
        out = med_generate(model, ids, G, 4, entropy_threshold=0.9, eos_token_id=EOS,
                           forbid_eos=True, **kw)
    elif name == "threshold":
        out = fast_generate(model, ids, G, 4, threshold=0.3, temperature=0.5, eos_token_id=EOS,
                            **kw)
    elif name == "tolerator":
        out = tolerator_generate(model, ids, G, 6, eot_token_ids=[EOS, EOT], rho=0.7,
                                 gamma_start=0.5, block_length=8, **kw)
    elif name == "block":
        out = block_generate(model, ids, G, 4, 2, threshold=0.3, minimal_topk=2, use_cache=False,
                             eos_token_id=EOS, eot_token_id=EOT, **kw)
    elif name == "hex":
        hx = hex_generate(model, ids, G, decode=codec.decode, extract=ext, block_lengths=[2, 4],
                          tokens_per_step=1, eos_token_id=EOS, eot_token_id=EOT,
                          eos_zero_confidence=True, **kw)
        # each row shows the first member text that gave the voted answer
        texts = [t[a.index(v)] if v in a else t[0]
                 for v, a, t in zip(hx.answers, hx.member_answers, hx.member_texts, strict=True)]
        return texts, hx.answers, [hx.nfe] * len(texts)
    else:
        delim = codec.encode("####")
        out = infill_generate(model, ids, G - len(delim) - 2, delim, 2, entropy_threshold=5.0, **kw)
        texts = [codec.decode([t for t in r if t != MASK]) + "####" + codec.decode(a)
                 for r, a in zip(out.reasoning.tolist(), out.answer.tolist(), strict=True)]
        return texts, [ext(t) for t in texts], out.row_nfe.tolist()
    texts = [codec.decode(row) for row in out.generated.tolist()]
    return texts, [ext(t) for t in texts], out.row_nfe.tolist()


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_each_entry_runs_its_sampler(model_dir, name):  # noqa: F811
    model = load_pretrained(model_dir).eval()
    codec = TextCodec(model_dir, bos_token_id=0, stop_ids=[1])
    ids, attn = left_pad([codec.encode_prompt("what is 3 plus 4"), codec.encode_prompt("what")], 1)
    cfg = decode_config(name, gen_length=G, **SETTINGS[name])
    assert type(cfg) is DECODERS[name].config and cfg.method == name
    res = decode_batch(model, ids, attn, cfg, mask_token_id=MASK, eos_token_id=EOS,
                       eot_token_id=EOT, decode=codec.decode, extract=get_extractor("gsm8k"),
                       encode=codec.encode, generator=torch.Generator().manual_seed(3))
    texts, answers, nfe = direct(name, model, ids, attn, codec, torch.Generator().manual_seed(3))
    assert (res.texts, res.answers, res.row_nfe) == (texts, answers, nfe)
    assert len(texts) == 2


def test_registry_and_shipped_yamls_agree():
    shipped = sorted(p.stem for p in (REPO / "conf" / "decode").glob("*.yaml"))
    assert shipped == sorted(DECODERS)
    for name, entry in DECODERS.items():
        assert issubclass(entry.config, DecodeConfig) and entry.config().method == name


def test_decode_config_converts_and_refuses():
    cfg = decode_config("hex", gen_length="16", block_lengths=["4", "8"], forbid_eos="true")
    assert (cfg.gen_length, cfg.block_lengths, cfg.forbid_eos) == (16, [4, 8], True)
    with pytest.raises(LladaError, match=r"'med' has no setting\(s\) \['steps'\]"):
        decode_config("med", steps=4)  # a low_confidence knob
    with pytest.raises(LladaError, match="unknown"):
        decode_config("beam")
    with pytest.raises(LladaError, match="gen_length"):
        decode_config("med", gen_length="many")


def test_mismatched_method_name_is_refused(model_dir):  # noqa: F811
    cfg = decode_config("med")
    cfg.method = "random"
    with pytest.raises(LladaError, match="decode=random"):
        decode_batch(torch.nn.Identity(), torch.zeros(1, 2, dtype=torch.long), None, cfg,
                     mask_token_id=MASK, eos_token_id=EOS, eot_token_id=None,
                     decode=str, extract=lambda t: None)
