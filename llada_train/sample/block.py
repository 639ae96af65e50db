"""Block-diffusion decoding (BD3-LM, LLaDA 2.0, Fast-dLLM v2) with an exact KV cache.

A block model (``config.block_size`` = b > 0) attends block-causally: blocks of b positions
from position 0, each seeing itself and the blocks before it. Decoding fills one block at a
time, left to right; within a block it runs low-confidence steps or LLaDA 2.0's threshold
rule, optionally sub-block by sub-block (Fast-dLLM v2), and it stops a row once the block
holding its EOS is finished.

Blocks start at each row's position 0, as in training. A row of n prompt tokens therefore
starts decoding in block n // b, which already holds the prompt's last n mod b tokens. In a
batch, each row is left-padded by a whole number of blocks (``plan_blocks``) so that every
row's first block to decode is the same canvas block: padding never shares a block with
real tokens, RoPE is relative, so a row decodes as it would alone and sees the block
boundaries it saw in training. Its prompt may end at a different column than its neighbours'.

Finished blocks never attend to later ones, so their keys/values are exact once computed:
the first pass records the prompt's whole blocks (``PrefixCache(keep)``), each step then runs
only the current block against the cache, and the first step of the next block runs the
finished block together with the new one and keeps the finished block's keys/values
(``PrefixCache.append_next``). Cached and uncached decoding compute the same logits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llada_train.errors import LladaError
from llada_train.model.kv_cache import PrefixCache
from llada_train.sample.common import (
    NEG_INF,
    SampleOutput,
    chosen_probability,
    init_canvas,
    num_transfer_schedule,
    progress_bar,
    sample_tokens,
    top_k_mask,
)
from llada_train.sample.generate import commit_step, stop_ids

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``warning: message`` to stderr the first time this process sees it."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class BlockOutput(SampleOutput):
    """A ``SampleOutput`` whose rows end at different lengths.

    ``lengths`` (B,) counts each row's generated tokens: up to the end of the block holding
    its first EOS/EoT, else all it decoded. Positions past it hold EOS (MASK without one).
    """

    lengths: torch.Tensor | None = None  # (B,) int64


@dataclass
class BlockLayout:
    """Where every row sits on the decoding canvas."""

    canvas: torch.Tensor  # (B, T): padding, prompt, MASK
    attention_mask: torch.Tensor | None  # (B, T); None without padding
    gen_start: torch.Tensor  # (B,) canvas column of each row's first generated token
    block: int  # block size on the canvas (T when the canvas is one block)
    model_block_size: int  # what the model is called with: block, or 0 for one block
    first_block: int  # the first block to decode, holding the prompts' ends
    n_blocks: int
    width: int  # generated tokens returned per row: the most any row has room for


def prompt_lengths(prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Real tokens per row (B,); the mask must be left padding (zeros, then ones)."""
    if prompt_ids.dim() != 2:
        raise LladaError(f"prompt_ids must be (batch, length), got shape {tuple(prompt_ids.shape)}")
    B, P = prompt_ids.shape
    if attention_mask is None:
        return torch.full((B,), P, dtype=torch.long, device=prompt_ids.device)
    if attention_mask.shape != prompt_ids.shape:
        raise LladaError(
            f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}"
        )
    m = attention_mask.long()
    if bool((m[:, 1:] < m[:, :-1]).any()):
        raise LladaError("block decoding takes left-padded prompts: attention_mask must be 0s then 1s per row")
    return m.sum(1)


def plan_blocks(
    prompt_ids: torch.Tensor,  # (B, P), left-padded
    attention_mask: torch.Tensor | None,  # (B, P)
    block_size: int,  # > 0, or 0 for one block over prompt and generation
    max_new_tokens: int,
    mask_token_id: int,
) -> BlockLayout:
    """The canvas: each row's prompt starting on a block boundary, room for >= G tokens each.

    With blocks, row i (n_i prompt tokens) is padded by (K - n_i // b) whole blocks, K the
    largest n_i // b, so all rows decode canvas blocks K, K + 1, ...; the canvas ends at the
    first block boundary that leaves every row ``max_new_tokens``. One block (b = 0) is the
    full-diffusion canvas of ``generate``: the prompts as given, then G MASK tokens.
    """
    if max_new_tokens < 1:
        raise LladaError(f"max_new_tokens (gen_length) must be >= 1, got {max_new_tokens}")
    n = prompt_lengths(prompt_ids, attention_mask)  # (B,)
    B, P = prompt_ids.shape
    dev = prompt_ids.device
    if block_size == 0:
        canvas, attn = init_canvas(prompt_ids, max_new_tokens, mask_token_id, attention_mask)
        T = canvas.shape[1]
        start = torch.full((B,), P, dtype=torch.long, device=dev)
        return BlockLayout(canvas, attn, start, T, 0, 0, 1, max_new_tokens)
    b = block_size
    K = int((n // b).max())
    pad = (K - n // b) * b  # (B,) whole blocks of padding
    tail = n % b  # prompt tokens in block K
    N = -(-(int(tail.max()) + max_new_tokens) // b)  # blocks to decode
    T = (K + N) * b
    canvas = torch.full((B, T), mask_token_id, dtype=torch.long, device=dev)
    attn = torch.ones((B, T), dtype=torch.long, device=dev)
    for i in range(B):
        p, k = int(pad[i]), int(n[i])
        canvas[i, :p] = 0  # never seen: padding keys are masked, its own outputs unused
        canvas[i, p : p + k] = prompt_ids[i, P - k :]
        attn[i, :p] = 0
    start = pad + n  # (B,)
    width = T - int(start.min())
    return BlockLayout(canvas, None if bool(attn.all()) else attn, start, b, b, K, K + N, width)


def commit_block(
    xb: torch.Tensor,  # (B, b) the block
    logits: torch.Tensor,  # (B, b, V)
    candidates: torch.Tensor,  # (B, b) bool: masked positions of the current (sub-)block
    count: torch.Tensor,  # (B,) the step's scheduled commits
    threshold: float | None,
    minimal_topk: int,
    temperature: float,
    generator: torch.Generator | None,
    mask_token_id: int,
) -> torch.Tensor:
    """One step inside a block: the ``count`` most confident candidates (``generate``'s
    step), or with ``threshold`` LLaDA 2.0's rule with k = max(minimal_topk, count)."""
    if threshold is None:
        return commit_step(xb, logits, candidates, count, temperature, "low_confidence", generator,
                           mask_token_id=mask_token_id)[0]
    k = torch.minimum(count.clamp(min=minimal_topk), candidates.sum(1))  # (B,)
    x0 = sample_tokens(logits, temperature, generator, mask_token_id=mask_token_id)  # (B, b)
    conf = torch.where(candidates, chosen_probability(logits, x0), NEG_INF)  # full softmax
    return torch.where(threshold_picks(conf, threshold, k), x0, xb)


def threshold_picks(confidence: torch.Tensor, threshold: float, count: torch.Tensor) -> torch.Tensor:
    """LLaDA 2.0's rule, bool (B, L): every position with confidence > tau when there are at
    least ``count[row]`` of them, else the ``count[row]`` most confident (-inf: never)."""
    high = confidence > threshold  # (B, L)
    top = top_k_mask(confidence, count)
    return torch.where((high.sum(1) >= count)[:, None], high, top)


class _BlockRunner:
    """Logits of one block per call, from the cache or by re-running the prefix."""

    def __init__(self, model: torch.nn.Module, layout: BlockLayout, use_cache: bool) -> None:
        self.model, self.layout = model, layout
        # shift_logits: the first position of a block is predicted from the previous one, so
        # that (finished) position runs with the block and the cache stops one short of it
        self.overlap = int(bool(getattr(getattr(model, "config", None), "shift_logits", False)))
        keep = max(layout.first_block * layout.block - self.overlap, 0)
        one_block = layout.n_blocks == 1 and layout.first_block == 0  # nothing to cache
        self.cache = PrefixCache(keep) if use_cache and not one_block else None

    def __call__(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """fp32 logits of canvas positions [start, end), (B, end - start, V)."""
        attn = self.layout.attention_mask
        attn = None if attn is None else attn[:, :end]
        kw = {"block_size": self.layout.model_block_size}
        cache, first = self.cache, 0
        if cache is not None and cache.filled:
            first = cache.length
            target = max(start - self.overlap, 0)  # positions the cache holds after this pass
            if target > first:
                cache.append_next(target - first)  # the finished block joins the prefix
            kw["cache"] = cache
        elif cache is not None:
            kw["cache"] = cache  # the recording pass: prompt blocks (and the block) in full
        out = self.model(x[:, first:end], attention_mask=attn, **kw)
        return getattr(out, "logits", out).float()[:, start - first :]


@torch.no_grad()
def block_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,  # (B, P), left-padded when prompts differ in length
    max_new_tokens: int = 128,
    block_size: int | None = None,
    steps: int | None = None,
    *,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,  # (B, P), 1 = real token
    threshold: float | None = None,
    minimal_topk: int = 1,
    sub_block_size: int | None = None,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    eot_token_id: int | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
) -> BlockOutput:
    """Decode at least ``max_new_tokens`` per prompt, block by block (see the module doc).

    ``block_size`` None takes the model's ``config.block_size``; 0 decodes one block over
    prompt and generation (full diffusion, as ``generate`` with one block). ``steps`` per
    block (None = one token per step) follow ``num_transfer_schedule``; ``threshold`` tau
    switches to LLaDA 2.0's rule: commit every masked position with confidence > tau when
    that is at least k = max(minimal_topk, scheduled count) positions, else the top k, so a
    block still ends within ``steps`` (the schedule splits the block's masked positions, as
    ``generate`` does; LLaDA 2.0 splits the block length). ``sub_block_size`` fills the
    block's sub-blocks in order, ``steps / (block / sub_block_size)`` steps each. Rows stop
    after the block holding their first EOS/EoT (``stop_at_eos``). ``use_cache=False``
    re-runs the prefix at every step (the reference). ``on_logits(block, logits)`` sees
    each step's (B, block, V) logits. ``nfe`` counts model calls.
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise LladaError(f"threshold={threshold} must be in [0, 1]")
    if minimal_topk < 1:
        raise LladaError(f"minimal_topk={minimal_topk} must be >= 1")
    b = resolve_block_size(model, block_size)
    layout = plan_blocks(prompt_ids, attention_mask, b, max_new_tokens, mask_token_id)
    size = layout.block
    sub = sub_block_size or size
    if sub_block_size is not None and not b:
        raise LladaError("sub_block_size needs blocks: set block_size > 0")
    if sub < 1 or size % sub:
        raise LladaError(f"sub_block_size={sub_block_size} must divide the block size ({b})")
    units = size // sub
    per_block = steps if steps is not None else (size if b else max_new_tokens)
    if per_block < 1 or per_block % units:
        raise LladaError(f"steps={per_block} per block must be a positive multiple of the "
                         f"{units} sub-block(s) per block")
    per_unit = per_block // units
    if b and max_new_tokens % b:
        warn_once(f"block decode: gen_length={max_new_tokens} is not a multiple of block_size={b}; "
                  "rounded up: decoding stops on a block boundary")
    stops = stop_ids(eos_token_id, eot_token_id) if stop_at_eos else []
    fill = stop_ids(eos_token_id, eot_token_id)[:1] or [mask_token_id]
    x = layout.canvas.clone()
    B, T = x.shape
    start = layout.gen_start  # (B,)
    lengths = T - start  # (B,) room per row, cut at an EOS block below
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    row_nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    nfe = 0
    run = _BlockRunner(model, layout, use_cache)
    bar = progress_bar(layout.n_blocks - layout.first_block, progress, "block_generate")
    for j in range(layout.first_block, layout.n_blocks):
        s, e = j * size, (j + 1) * size
        for u in range(units):
            unit = torch.zeros(size, dtype=torch.bool, device=x.device)
            unit[u * sub : (u + 1) * sub] = True  # (size,)
            schedule = num_transfer_schedule(((x[:, s:e] == mask_token_id) & unit).sum(1), per_unit)
            for step in range(per_unit):
                candidates = (x[:, s:e] == mask_token_id) & unit  # (B, size)
                if not bool(candidates.any()):
                    break
                logits = run(x, s, e)  # (B, size, V)
                if on_logits is not None:
                    on_logits(j, logits)
                nfe += 1
                row_nfe += candidates.any(1)
                x[:, s:e] = commit_block(x[:, s:e], logits, candidates, schedule[:, step], threshold,
                                         minimal_topk, temperature, generator, mask_token_id)
        bar.update()
        if stops:
            generated = torch.arange(s, e, device=x.device)[None, :] >= start[:, None]  # (B, size)
            hit = (torch.isin(x[:, s:e], torch.tensor(stops, device=x.device)) & generated).any(1)
            newly = hit & ~done
            lengths = torch.where(newly, e - start, lengths)
            x[newly, e:] = fill[0]  # nothing left to decode for these rows
            done |= newly
            if bool(done.all()):
                break
    bar.close()
    cols = start[:, None] + torch.arange(layout.width, device=x.device)[None, :]  # (B, W)
    gen = x.gather(1, cols.clamp(max=T - 1))
    gen = torch.where(cols < T, gen, torch.full_like(gen, fill[0]))  # rows with less room
    tokens = torch.cat([prompt_ids.long(), gen], dim=1)
    return BlockOutput(tokens=tokens, nfe=nfe, prompt_length=prompt_ids.shape[1], row_nfe=row_nfe,
                       lengths=lengths)


def resolve_block_size(model: torch.nn.Module, block_size: int | None) -> int:
    """The block size to decode with: the argument, else the model's; warns on a model
    trained without blocks (its ``config.block_size`` is 0)."""
    trained = int(getattr(getattr(model, "config", None), "block_size", 0) or 0)
    b = trained if block_size is None else int(block_size)
    if b < 0:
        raise LladaError(f"block_size={b} must be >= 0 (0 = one block over the whole sequence)")
    if trained == 0:
        how = f"block-causal attention with blocks of {b}, which it never saw" if b else \
            "one block over prompt and generation (full diffusion)"
        warn_once(f"block decode on a model trained without blocks (config.block_size=0): {how}")
    return b
