"""Bidirectional LLaMA-style mask predictor with the released LLaDA parameter names (SPEC §1)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig
from llada_train.model.kv_cache import LayerKV, PrefixCache
from llada_train.model.layers import (
    FlashFn,
    RMSNorm,
    RopeTable,
    apply_rotary,
    attend,
    resolve_flash_attn,
)
from llada_train.model.masks import attention_layout
from llada_train.model.moe import build_moe
from llada_train.model.remat import check_policy, checkpointed_call


class LLaDABlock(nn.Module):
    """One pre-norm block: attention (full, or causal for the AR twin), then a SwiGLU MLP.

    In a mixture-of-experts layer (``cfg.is_moe_layer(layer)``) the feed-forward is the routed
    experts (``moe``) plus, when the config has one, a shared expert: the block's own SwiGLU
    at the shared width (no ``ff_proj``/``up_proj``/``ff_out`` without one).
    """

    def __init__(self, cfg: ModelConfig, flash: FlashFn | None = None, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.flash = flash  # resolved once at build; None = SDPA
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        qkv_bias = cfg.include_qkv_bias  # Qwen2-family conversions; never the released model
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        if cfg.qk_norm:  # per-head RMSNorm of q and k before RoPE (Qwen3, LLaDA 2.x)
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        width = cfg.ffn_width(layer)  # the dense MLP, or a MoE layer's shared expert (0: none)
        self.ff_proj = nn.Linear(d, width, bias=False) if width else None  # SiLU gate
        self.up_proj = nn.Linear(d, width, bias=False) if width else None
        self.ff_out = nn.Linear(width, d, bias=False) if width else None  # down projection
        self.moe = build_moe(cfg, layer)  # routed experts, None in a dense layer

    def attention(
        self,
        x: torch.Tensor,  # (B, L, d), normed
        cos: torch.Tensor,  # (L, hd) fp32, phases of x's absolute positions
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,  # (B, 1, 1 or L, keys) bool, True = attend
        kv: LayerKV | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attention output (B, L, d); with a filled ``kv`` slot keys are cached prefix + x."""
        cfg = self.cfg
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, cfg.n_heads, cfg.head_dim)  # (B, L, H, hd)
        k = self.k_proj(x).view(B, L, cfg.n_kv_heads, cfg.head_dim)  # (B, L, H_kv, hd)
        v = self.v_proj(x).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # over each head's hd features
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, L, hd), (B, H_kv, L, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, H_kv, keys, hd)
        return self.attn_out(attend(q, k, v, key_mask, self.flash, is_causal))

    def body(
        self,
        x: torch.Tensor,  # (B, L, d)
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
        kv: LayerKV | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """The block's output (B, L, d), never checkpointed."""
        h = x + self.attention(self.attn_norm(x), cos, sin, key_mask, kv, is_causal)
        return h + self.feed_forward(self.ff_norm(h))

    def feed_forward(self, m: torch.Tensor) -> torch.Tensor:
        """SwiGLU of the normed m (B, L, d), plus the routed experts in a MoE layer."""
        if self.moe is None:
            return self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))
        routed = self.moe(m)  # (B, L, d)
        if self.ff_proj is None:
            return routed
        return routed + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))

    def forward(
        self,
        x: torch.Tensor,  # (B, L, d)
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
        kv: LayerKV | None = None,
        recompute: str | None = None,  # an activation-checkpointing policy, or None
        is_causal: bool = False,
    ) -> torch.Tensor:
        """The block's output (B, L, d), checkpointed under ``recompute`` when given.

        The checkpoint sits inside ``forward`` so that a compiled block compiles it too:
        torch.compile then plans the recomputation itself (as torchtitan's wrapped blocks do).
        The model decides ``recompute`` per call, so blocks hold no per-layer constants that
        would make torch.compile build a graph per block.
        """
        if recompute is not None:
            return checkpointed_call(self.body, recompute, x, cos, sin, key_mask, kv, is_causal)
        return self.body(x, cos, sin, key_mask, kv, is_causal)


class LLaDAModel(nn.Module):
    """The mask predictor: ``logits = model(input_ids, attention_mask)``, shape (B, L, V).

    Parameter names equal the released checkpoint's (``model.transformer.*``), so import and
    export are plain copies.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_policy(cfg.checkpoint_policy)
        self.config = cfg
        flash = resolve_flash_attn(cfg.attention_backend)
        transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.d_model),
                "blocks": nn.ModuleList(LLaDABlock(cfg, flash, i) for i in range(cfg.n_layers)),
                "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
                "ff_out": nn.Linear(cfg.d_model, cfg.vocab_size, bias=False),
            }
        )
        self.model = nn.Module()
        self.model.transformer = transformer
        self.rope = RopeTable(  # partial RoPE: the table spans the rotated features only
            cfg.rotary_dim, cfg.rope_theta, cfg.max_sequence_length, cfg.rope_scaling_params
        )

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    @torch.no_grad()
    def init_weights(
        self, generator: torch.Generator, param_context: Callable[..., Any] | None = None
    ) -> None:
        """Normal(0, init_std) matrices (residual outputs / sqrt(2 n_layers)), unit norm weights,
        zero q/k/v biases (when the config has them); stacked expert weights (3-D) draw like
        matrices (down projections as residual outputs), expert biases start at 0.

        Draws happen in parameter order from ``generator``, so every ZeRO stage gets the same
        weights; ``param_context(p)`` wraps each write (ZeRO-3 passes a gather context).
        """
        std = self.config.init_std
        for name, p in self.named_parameters():
            with param_context(p) if param_context else contextlib.nullcontext():
                if p.ndim == 1:
                    zero = name.endswith((".bias", "expert_bias"))
                    p.fill_(0.0 if zero else 1.0)  # biases draw nothing
                    continue
                residual_out = ".blocks." in name and name.endswith(
                    ("attn_out.weight", "ff_out.weight", "moe.down_proj")
                )
                s = std / math.sqrt(2 * self.config.n_layers) if residual_out else std
                values = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, s, generator=generator)
                p.copy_(values)
        for name, b in self.named_buffers():  # fp32 buffers, whole on every rank: no context
            if name.endswith("expert_bias"):
                b.zero_()

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` each block in place (``nn.Module.compile``: no ``_orig_mod.`` names).

        Blocks are the unit because they repeat: one compiled graph serves them all, and the
        embedding, head and loss stay eager (the loss may gather rows of varying count).
        """
        for block in self.transformer.blocks:
            block.compile(backend=backend)

    def use_flex(self, device: torch.device) -> bool:
        """flex_attention for block-diffusion layouts (``attention_backend=flex``): on CUDA,
        and on CPU without gradients (torch's CPU flex has no backward: training there keeps
        the dense SDPA mask, the same numbers)."""
        if self.config.attention_backend != "flex":
            return False
        return device.type == "cuda" or not torch.is_grad_enabled()

    def recompute_policy(self, layer: int) -> str | None:
        """The activation-checkpointing policy block ``layer`` runs under now, or None."""
        cfg = self.config
        on = cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        return cfg.checkpoint_policy if on and layer % cfg.checkpoint_every == 0 else None

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) int64
        attention_mask: torch.Tensor | None = None,  # (B, keys), 1 = real token
        *,
        return_hidden: bool = False,
        cache: PrefixCache | None = None,
        document_ids: torch.Tensor | None = None,  # (B, L) int64, packed documents
        block_size: int | None = None,  # None: config.block_size (0 = no blocks)
        paired: bool = False,  # input_ids is cat(x_t, x_0), (B, 2L): block-diffusion training
    ) -> torch.Tensor:
        """Logits (B, L, V); with ``return_hidden`` the last block's output (B, L, d) before
        ``ln_f``, so a loss can run ``ln_f`` and the head on the rows it needs only.

        Attention is bidirectional, or causal with ``config.causal``; ``document_ids`` makes
        it block-diagonal (positions attend only to equal ids; combined with the padding and
        causal masks). RoPE is relative, so packed documents need no position reset. With
        ``config.shift_logits`` row i holds the prediction made at position i-1 (row 0 its own).

        With a block size (``config.block_size`` or the argument) attention is block-causal:
        blocks of that size from absolute position 0, each seeing itself and earlier blocks.
        With ``paired`` the input is BD3-LM's ``cat(x_t, x_0)`` of length 2L: both halves take
        positions 0..L-1, attention follows ``masks.block_diffusion_rule``, ``document_ids`` is
        given for one half (B, L), and only the x_t half's L rows are returned (with
        ``shift_logits``, a block's first row from the clean copy: see ``shift_paired``).

        With an empty ``cache`` the pass is the plain one and records the prefix keys/values;
        with a filled one ``input_ids`` is the suffix after the cached positions and
        ``attention_mask`` covers prefix and suffix (see ``PrefixCache``).
        """
        t = self.transformer
        B, L = input_ids.shape
        offset = 0
        if cache is not None:
            if cache.filled:
                if len(cache.layers) != len(t.blocks):
                    raise LladaError(
                        f"PrefixCache holds {len(cache.layers)} layers; this model has {len(t.blocks)}"
                    )
                offset = cache.length
            else:
                cache.clear()  # a pass that failed half-way must not leave stale layers
        if attention_mask is not None and attention_mask.shape[1] != offset + L:
            raise LladaError(
                f"attention_mask covers {attention_mask.shape[1]} positions; expected {offset + L} "
                f"({offset} cached + {L} given)"
            )
        if block_size is None:
            block_size = self.config.block_size
        x = t.wte(input_ids)  # (B, L, d)
        if paired:
            half = L // 2
            cos, sin = self.rope.get(0, half, input_ids.device)  # (L/2, hd): both halves 0..L/2-1
            cos, sin = torch.cat([cos, cos]), torch.cat([sin, sin])  # (L, hd)
            if document_ids is not None:
                document_ids = torch.cat([document_ids, document_ids], dim=1)  # (B, L)
        else:
            cos, sin = self.rope.get(offset, L, input_ids.device)  # (L, hd) fp32
        layout = attention_layout(
            B, L, offset, attention_mask, document_ids, self.config.causal, input_ids.device,
            block_size=block_size, paired=paired, flex=self.use_flex(input_ids.device),
        )
        mask, causal = layout.mask, layout.is_causal
        for i, block in enumerate(t.blocks):
            if cache is None:
                x = block(x, cos, sin, mask, None, self.recompute_policy(i), causal)
            else:  # inference with a prefix cache: never checkpointed
                x = block(x, cos, sin, mask, cache.layer(i), None, causal)
        if paired and self.config.shift_logits:
            x = shift_paired(x, block_size)  # (B, L/2, d)
        elif paired:
            x = x[:, : L // 2]  # (B, L/2, d): only the noisy half is predicted
        elif self.config.shift_logits:
            x = shift_hidden(x, cache)
        elif cache is not None:
            cache.filled = True
        if return_hidden:
            return x  # (B, L, d)
        return t.ff_out(t.ln_f(x))  # (B, L, V)


def shift_hidden(x: torch.Tensor, cache: PrefixCache | None) -> torch.Tensor:
    """Rows moved one position right (row i <- row i-1), so the AR head's next-token
    prediction lands on the position it predicts; row 0 keeps its own (Dream-7B's choice).

    With a cache the row before a suffix is the prefix's last (unshifted) hidden state,
    which the recording pass stores in the cache.
    """
    before = x[:, :1]  # (B, 1, d): position 0 has no predecessor
    if cache is not None:
        if cache.filled and cache.last_hidden is not None:
            before = cache.last_hidden
        if not cache.filled and cache.keep > 0:
            cache.last_hidden = x[:, cache.keep - 1 : cache.keep].clone()  # not all of x
        elif cache.filled and cache.grow:
            cache.last_hidden = x[:, -1:]
        cache.filled = True
    return torch.cat([before, x[:, :-1]], dim=1)  # (B, L, d)


def shift_paired(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``shift_hidden`` for a paired pass ``cat(x_t, x_0)`` (B, 2L, d) -> the x_t rows (B, L, d).

    Token i is predicted from position i-1 (Fast-dLLM v2's token shift). Inside a block that
    is the noisy row i-1; for the first token of block b > 0 it is the clean row i-1 (the
    last token of clean block b-1, which sees clean blocks <= b-1): exactly what the
    block-causal inference pass gives it (its row i-1 is the finished block's last token),
    and never a noisy block the token's own block cannot see. Row 0 keeps its own.
    """
    half = x.shape[1] // 2
    xt, x0 = x[:, :half], x[:, half:]
    prev_t = torch.cat([xt[:, :1], xt[:, :-1]], dim=1)  # (B, L, d) row i <- noisy row i-1
    prev_0 = torch.cat([x0[:, :1], x0[:, :-1]], dim=1)  # row i <- clean row i-1
    pos = torch.arange(half, device=x.device)
    first = ((pos % block_size == 0) & (pos > 0))[None, :, None]  # (1, L, 1) block starts
    return torch.where(first, prev_0, prev_t)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count, built on the meta device (no memory is allocated): every tensor
    of the released layout, the MoE expert biases (fp32 buffers) included."""
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    return sum(t.numel() for t in model.state_dict().values())
