"""Block-diffusion decoding (issue 21): exact cache, layout, stopping, threshold rule, NFE.

References: block decoding written out from its definition (one row, no cache, the whole
prefix re-run block-causally each step), the full-diffusion sampler ``generate`` for one
block, and each row decoded alone for a left-padded batch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llada_train.errors import LladaError
from llada_train.model import LLaDAModel, ModelConfig, save_pretrained
from llada_train.sample import block as block_mod
from llada_train.sample import generate, left_pad
from llada_train.sample.block import block_generate, plan_blocks, threshold_picks
from tests.conftest import REPO

MASK, EOS, PAD, V = 23, 1, 1, 24
PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [5, 6, 7, 8, 9, 10, 11, 12, 13]]  # 6, 3, 9 tokens


def tiny(block_size: int, shift: bool = False, seed: int = 1, n_layers: int = 2) -> LLaDAModel:
    cfg = ModelConfig(d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, mlp_hidden_size=64,
                      vocab_size=V, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD,
                      bos_token_id=0, init_std=0.5, block_size=block_size, shift_logits=shift)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


class Counter(torch.nn.Module):
    """Counts forward calls and the positions they ran."""

    def __init__(self, inner: LLaDAModel) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.calls = self.positions = 0

    def forward(self, x, attention_mask=None, **kw):
        self.calls += 1
        self.positions += x.numel()
        return self.inner(x, attention_mask=attention_mask, **kw)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal within ``rel`` of the reference's scale (logits near 0 have no meaningful ratio)."""
    return a.shape == b.shape and float((a - b).abs().max()) <= rel * float(b.abs().max())


@torch.no_grad()
def reference_decode(model: LLaDAModel, prompt: list[int], gen: int, b: int, sub: int | None = None) -> list[int]:
    """Block decoding from its definition, one token per step: blocks from position 0, the
    block holding the prompt's end first; every step re-runs positions [0, block end)
    block-causally and commits the most confident masked position of the (sub-)block, its
    token the argmax over non-MASK ids, its confidence that token's full-softmax probability."""
    sub = sub or b
    n = len(prompt)
    first, blocks = n // b, -(-(n % b + gen) // b)
    x = prompt + [MASK] * ((first + blocks) * b - n)
    for j in range(first, first + blocks):
        end = (j + 1) * b
        for us in range(j * b, end, sub):
            while MASK in x[us : us + sub]:
                logits = model(torch.tensor([x[:end]]), block_size=b)[0].float()  # (end, V)
                probs = torch.softmax(logits, -1)
                best = None
                for i in range(us, us + sub):
                    if x[i] == MASK:
                        tok = int(logits[i, :MASK].argmax())  # MASK is the last id
                        if best is None or probs[i, tok] > best[0]:
                            best = (float(probs[i, tok]), i, tok)
                x[best[1]] = best[2]
    return x[n:]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("sub", [None, 2])
def test_single_rows_match_the_definition(shift, sub):
    model = tiny(4, shift)
    for prompt in PROMPTS:
        out = block_generate(model, torch.tensor([prompt]), 7, sub_block_size=sub, mask_token_id=MASK)
        want = reference_decode(model, prompt, 7, 4, sub)
        assert out.generated[0].tolist() == want
        assert int(out.lengths[0]) == len(want) >= 7  # ends on a block boundary
        assert out.tokens[0, :len(prompt)].tolist() == prompt


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("mode", [dict(), dict(threshold=0.3, steps=2), dict(sub_block_size=2, temperature=0.8)])
def test_cached_equals_uncached_tokens_and_logits(shift, mode):
    model = tiny(4, shift)
    ids, attn = left_pad(PROMPTS, PAD)
    runs = {}
    for use_cache in (True, False):
        seen: list[tuple[int, torch.Tensor]] = []
        counter = Counter(model)
        out = block_generate(counter, ids, 10, attention_mask=attn, mask_token_id=MASK,
                             use_cache=use_cache, generator=torch.Generator().manual_seed(4),
                             on_logits=lambda j, lg, seen=seen: seen.append((j, lg)), **mode)
        runs[use_cache] = (out, seen, counter)
    (cached, c_logits, c_count), (plain, p_logits, p_count) = runs[True], runs[False]
    assert torch.equal(cached.tokens, plain.tokens)
    assert len(c_logits) == len(p_logits) == cached.nfe == plain.nfe == c_count.calls == p_count.calls
    for (j, a), (k, b) in zip(c_logits, p_logits, strict=True):
        assert j == k and close(a, b), (j, float((a - b).abs().max()))
    assert c_count.positions < p_count.positions / 1.5  # the cache runs one block per step


def test_left_padded_batch_decodes_each_row_as_alone():
    model = tiny(4)
    ids, attn = left_pad(PROMPTS, PAD)
    first: dict[int, torch.Tensor] = {}  # canvas block -> its first step's logits
    batch = block_generate(model, ids, 9, attention_mask=attn, mask_token_id=MASK,
                           on_logits=lambda j, lg: first.setdefault(j, lg))
    assert batch.tokens[:, : ids.shape[1]].tolist() == ids.tolist()
    # rows of 6, 3, 9 tokens start in their blocks 1, 0, 2: padded by 1, 2, 0 blocks of 4
    layout = plan_blocks(ids, attn, 4, 9, MASK)
    assert (layout.first_block, layout.n_blocks, layout.gen_start.tolist()) == (2, 5, [10, 11, 9])
    assert layout.attention_mask[1, :8].tolist() == [0] * 8 and layout.attention_mask[0].sum() == 16
    for i, (prompt, pad_blocks) in enumerate(zip(PROMPTS, (1, 2, 0), strict=True)):
        own: dict[int, torch.Tensor] = {}
        alone = block_generate(model, torch.tensor([prompt]), 9, mask_token_id=MASK,
                               on_logits=lambda j, lg, own=own: own.setdefault(j, lg))
        n = int(alone.lengths[0])
        assert batch.generated[i, :n].tolist() == alone.generated[0, :n].tolist()
        assert int(batch.row_nfe[i]) == int(alone.row_nfe[0]) == alone.nfe
        # same logits up to float error: the row's positions moved by whole blocks
        assert sorted(own) == [j - pad_blocks for j in sorted(first)]
        assert all(close(first[j][i], own[j - pad_blocks][0]) for j in first)


def test_one_block_reproduces_the_full_diffusion_sampler():
    full = tiny(0)
    ids, attn = left_pad(PROMPTS, PAD)
    for steps in (12, 6):
        want = generate(full, ids, 12, steps, None, mask_token_id=MASK, attention_mask=attn)
        got = block_generate(full, ids, 12, None, steps, mask_token_id=MASK, attention_mask=attn)
        assert torch.equal(got.tokens, want.tokens)
        assert got.nfe == want.nfe and torch.equal(got.row_nfe, want.row_nfe)
    # a block model whose one block holds prompt and generation: the same tokens
    one = tiny(16)
    one.load_state_dict(full.state_dict())
    prompt = torch.tensor([PROMPTS[0], [9, 10, 11, 12, 13, 14]])
    want = generate(one, prompt, 10, 10, None, mask_token_id=MASK)
    got = block_generate(one, prompt, 10, mask_token_id=MASK)
    assert torch.equal(got.tokens, want.tokens) and got.nfe == 10
    assert torch.equal(got.tokens, generate(full, prompt, 10, 10, None, mask_token_id=MASK).tokens)


def test_eos_stops_each_row_after_its_block():
    model = tiny(4)
    ids, attn = left_pad(PROMPTS, PAD)
    free = block_generate(model, ids, 16, attention_mask=attn, mask_token_id=MASK)
    # an id row 0 decodes in its first block and some other row only later or never
    eos = next(t for t in free.generated[0, :2].tolist()
               if any(t not in free.generated[i, :4].tolist() for i in (1, 2)))
    stopped = block_generate(model, ids, 16, attention_mask=attn, mask_token_id=MASK, eos_token_id=eos)
    layout = plan_blocks(ids, attn, 4, 16, MASK)
    for i in range(3):
        row = free.generated[i].tolist()
        room = len(row) - (int(layout.gen_start[i]) - int(layout.gen_start.min()))
        if eos in row[:room]:  # the end of the block holding the first EOS
            pos = int(layout.gen_start[i]) + row.index(eos)
            want = (pos // 4 + 1) * 4 - int(layout.gen_start[i])
        else:
            want = room
        assert int(stopped.lengths[i]) == want
        assert stopped.generated[i, :want].tolist() == row[:want]
        assert set(stopped.generated[i, want:].tolist()) <= {eos}
    assert len(set(stopped.lengths.tolist())) > 1  # variable lengths in one batch
    assert int(stopped.lengths[0]) <= 4 and stopped.nfe <= free.nfe
    assert int(stopped.row_nfe[0]) < int(free.row_nfe[0])


def test_threshold_rule_picks():
    inf = float("-inf")
    conf = torch.tensor([[0.9, 0.2, 0.95, inf],  # two above tau >= k = 1: both
                         [0.3, 0.4, 0.1, 0.2],  # none above: the top 2
                         [0.85, 0.5, 0.6, inf],  # one above < k = 2: the top 2
                         [0.99, inf, inf, inf]])  # k = 3 > candidates: never a -inf one
    picks = threshold_picks(conf, 0.8, torch.tensor([1, 2, 2, 3]))
    assert picks.tolist() == [[True, False, True, False], [True, True, False, False],
                              [True, False, True, False], [True, False, False, False]]
    assert threshold_picks(conf[:1], 0.95, torch.tensor([1])).tolist() == [[False, False, True, False]]


def test_threshold_and_minimal_topk_set_the_steps():
    model = Counter(tiny(4))
    prompt = torch.tensor([PROMPTS[0]])  # 6 tokens: block 1 holds 2 masks, then 2 whole blocks
    everything = block_generate(model, prompt, 10, threshold=0.0, mask_token_id=MASK)
    assert everything.nfe == 3 == model.calls  # every probability is > 0: one step per block
    pairs = block_generate(model, prompt, 10, threshold=1.0, minimal_topk=2, mask_token_id=MASK)
    assert pairs.nfe == 1 + 2 + 2  # nothing is > 1: the top 2 per step
    capped = block_generate(model, prompt, 10, None, 1, threshold=1.0, mask_token_id=MASK)
    assert capped.nfe == 3  # one step per block: its scheduled count is the whole block
    assert (capped.generated != MASK).all() and (pairs.generated != MASK).all()


def test_nfe_and_row_nfe_count_model_calls():
    model = Counter(tiny(4))
    ids, attn = left_pad(PROMPTS, PAD)
    out = block_generate(model, ids, 8, None, 2, attention_mask=attn, mask_token_id=MASK)
    assert out.nfe == model.calls == 2 * 3  # canvas blocks 2, 3, 4, 2 steps each
    # the 3-token row has 1 mask in its first block: nothing to fill in that block's 2nd step
    assert out.row_nfe.tolist() == [6, 5, 6]
    per_row = [block_generate(model.inner, torch.tensor([p]), 8, None, 2, mask_token_id=MASK).nfe
               for p in PROMPTS]
    assert per_row == out.row_nfe.tolist()  # what each row costs alone


def test_bad_input_is_one_line_and_warnings_come_once(monkeypatch, capsys):
    model = tiny(4)
    ids = torch.tensor([[3, 4, 5]])
    kw = dict(mask_token_id=MASK)
    with pytest.raises(LladaError, match="left-padded"):
        block_generate(model, ids, 4, attention_mask=torch.tensor([[1, 1, 0]]), **kw)
    with pytest.raises(LladaError, match="sub_block_size=3 must divide"):
        block_generate(model, ids, 4, sub_block_size=3, **kw)
    with pytest.raises(LladaError, match="multiple of the 2 sub-block"):
        block_generate(model, ids, 4, None, 3, sub_block_size=2, **kw)
    with pytest.raises(LladaError, match="threshold"):
        block_generate(model, ids, 4, threshold=1.5, **kw)
    with pytest.raises(LladaError, match="block_size=-1"):
        block_generate(model, ids, 4, -1, **kw)
    with pytest.raises(LladaError, match="gen_length"):
        block_generate(model, ids, 0, **kw)
    monkeypatch.setattr(block_mod, "_WARNED", set())
    capsys.readouterr()
    for _ in range(2):
        block_generate(model, ids, 6, **kw)
        block_generate(tiny(0), ids, 4, 2, **kw)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err)
    assert "gen_length=6 is not a multiple of block_size=4" in err[0]
    assert "trained without blocks" in err[1]


@pytest.mark.parametrize("n_layers", [1, 3])
def test_cache_stays_exact_over_many_blocks(n_layers):
    model = tiny(2, seed=5, n_layers=n_layers)
    ids, attn = left_pad([[3, 4, 5], [6]], PAD)
    logs: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    outs = {c: block_generate(model, ids, 16, attention_mask=attn, mask_token_id=MASK, use_cache=c,
                              on_logits=lambda j, lg, c=c: logs[c].append(lg)) for c in (True, False)}
    assert torch.equal(outs[True].tokens, outs[False].tokens)
    assert all(close(a, b) for a, b in zip(logs[True], logs[False], strict=True))
    assert outs[True].nfe == 1 + 2 * 8  # 1 mask in the first block, then 8 blocks of 2 steps


def block_model_export(tmp_path):
    """A seeded random block model (blocks of 4) with the eval tests' word tokenizer, saved
    under ``tmp_path / "export"``."""
    from tests.test_eval_cli import WORDS, make_tokenizer

    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=64,
                      vocab_size=len(WORDS), mask_token_id=2, eos_token_id=1, pad_token_id=1,
                      bos_token_id=0, init_std=1.0, block_size=4)
    model = LLaDAModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    make_tokenizer(tmp_path / "tokenizer.json")
    return save_pretrained(model.state_dict(), cfg, tmp_path / "export", tokenizer_dir=tmp_path / "tokenizer.json")


def test_generate_cli_decodes_a_block_model(tmp_path):
    folder = block_model_export(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "llada_train.cli.generate", f"model_path={folder}",
         "prompts=[what is 3 plus 4,what is 2]", "decode=block", "decode.gen_length=8",
         "decode.threshold=0.5", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("### prompt:") == 2 and "method=block" in res.stdout
    assert "warning" not in res.stderr  # a block model, a block multiple: nothing to warn about


@torch.no_grad()
def test_append_next_keeps_only_the_finished_positions():
    from llada_train.model import PrefixCache

    model = tiny(4)
    x = torch.randint(0, MASK, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = PrefixCache(keep=4)
    with pytest.raises(LladaError, match="filled cache"):
        cache.append_next(4)
    model(x[:, :8], cache=cache)  # records block 0
    cache.append_next(4)
    out = model(x[:, 4:12], cache=cache)  # block 1 (finished) and block 2; keeps block 1
    assert cache.length == 8
    ref = PrefixCache(keep=8)
    full = model(x, cache=ref)  # one block-causal pass records blocks 0 and 1
    for mine, want in zip(cache.keys + cache.values, ref.keys + ref.values, strict=True):
        assert close(mine, want)
    assert close(out, full[:, 4:])
    again = model(x[:, 8:12], cache=cache)  # later passes attend and keep nothing new
    assert cache.length == 8 and close(again, full[:, 8:])
    cache.append_next(5)
    with pytest.raises(LladaError, match="append_next\\(5\\) but the pass ran 4"):
        model(x[:, 8:12], cache=cache)
    with pytest.raises(LladaError, match="n=-1"):
        PrefixCache(keep=1).append_next(-1)
