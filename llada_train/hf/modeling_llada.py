"""Hugging Face model for LLaDA exports: the bidirectional mask predictor of SPEC §1.

Self-contained (imports only ``torch`` and ``transformers``): llada-train copies this file into
every export folder, where ``AutoModel.from_pretrained(folder, trust_remote_code=True)``
loads it. Parameter names equal the released checkpoint's (``model.transformer.*``), so the
export's safetensors load with no renaming. Works with transformers 4.4x-4.5x and 5.x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_llada import LLaDAConfig


class LLaDARMSNorm(nn.Module):
    """RMSNorm in fp32, cast back to the input dtype, then scaled (the released order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies (hd/2,) and the cos/sin factor; ``scaling`` is the config's
    ``rope_scaling_params`` (linear, llama3 or yarn, every parameter given), as transformers'
    ``ROPE_INIT_FUNCTIONS`` compute them (llada-train's ``layers.rope_inv_freq``)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / theta**exponent
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo = correction_dim(float(scaling["beta_fast"]))
        hi = correction_dim(float(scaling["beta_slow"]))
        if scaling["truncate"]:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: original frequency, 0: interpolated
        pos_freqs = theta**exponent
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
        return inv_freq, float(scaling["attention_factor"])
    raise ValueError(f"LLaDA: rope_scaling_params.rope_type={kind!r} is not implemented")


def rope_cos_sin(
    length: int, head_dim: int, theta: float, device: torch.device, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (length, head_dim) cos/sin of positions 0..length-1, halves repeated (rotate-half).

    Computed per call, not stored as a buffer: a buffer would be left on the meta device or
    rounded to bf16 by ``from_pretrained``, and the table costs next to nothing next to a layer.
    """
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(length, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq.to(device)  # (L, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, hd)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, L, hd) in fp32 (non-interleaved halves), cast back; tables
    narrower than hd (``partial_rotary_factor``) rotate the leading features only."""
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat((rotate(x[..., :width], cos, sin), x[..., width:]), dim=-1)
    xf = x.float()
    first, second = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


def is_moe_layer(config: LLaDAConfig, layer: int) -> bool:
    """Routed experts in this layer (``num_experts`` > 0, past ``first_k_dense_replace``)."""
    experts = int(getattr(config, "num_experts", 0) or 0)
    return experts > 0 and layer >= int(getattr(config, "first_k_dense_replace", 0) or 0)


def route(
    logits: torch.Tensor, bias: torch.Tensor, config: LLaDAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (N, k) and experts (N, k) from fp32 logits (N, E) and the expert bias.

    ``llada2``: s = sigmoid; choose on s + bias inside the ``topk_group`` groups with the
    highest top-2 biased sums; weights = s renormalised over the top-k x routed_scaling_factor.
    ``lladamoe``: p = softmax + bias; the top-k biased values are the weights.
    """
    k = int(config.num_experts_per_tok)
    if getattr(config, "router", "llada2") == "lladamoe":
        return (torch.softmax(logits, dim=-1) + bias).topk(k, dim=-1)
    scores = torch.sigmoid(logits)
    biased = scores + bias
    groups = int(getattr(config, "n_group", 1) or 1)
    if groups > 1:
        n, e = biased.shape
        top2 = biased.view(n, groups, e // groups).topk(min(2, e // groups), dim=-1).values.sum(-1)
        keep = top2.topk(int(config.topk_group), dim=-1).indices  # (N, topk_group)
        mask = torch.zeros_like(top2, dtype=torch.bool).scatter_(1, keep, True)
        biased = biased.masked_fill(~mask.repeat_interleave(e // groups, dim=1), float("-inf"))
    experts = biased.topk(k, dim=-1).indices
    weights = scores.gather(1, experts)
    if k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * float(getattr(config, "routed_scaling_factor", 1.0)), experts


class LLaDARouter(nn.Module):
    """Router weight (E, d) and expert bias (E,), applied in fp32."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.expert_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)


class LLaDAMoE(nn.Module):
    """Routed SwiGLU experts as stacked weights: gate/up (E, d_ff, d), down (E, d, d_ff)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        e, d, f = config.num_experts, config.d_model, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.router = LLaDARouter(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's top-k experts, weighted and summed; x and the output are (B, L, d)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        logits = F.linear(flat.float(), self.router.weight.float())  # (N, E) fp32
        weights, experts = route(logits, self.router.expert_bias.float(), self.config)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e in experts.unique().tolist():
            token, slot = (experts == e).nonzero(as_tuple=True)
            rows = flat[token]
            h = F.silu(F.linear(rows, self.gate_proj[e])) * F.linear(rows, self.up_proj[e])
            y = F.linear(h, self.down_proj[e]).float() * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out.to(x.dtype).view(x.shape)


class LLaDABlock(nn.Module):
    """Pre-norm block: attention (bidirectional unless ``config.causal``), then a SwiGLU MLP;
    in a mixture-of-experts layer the routed experts plus the block's SwiGLU as the shared
    expert (width ``shared_expert_intermediate_size``; none when 0)."""

    def __init__(self, config: LLaDAConfig, layer: int = 0) -> None:
        super().__init__()
        d, hd, mlp = config.d_model, config.head_dim, config.mlp_hidden_size
        moe = is_moe_layer(config, layer)
        if moe:
            mlp = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        qkv_bias = bool(getattr(config, "include_qkv_bias", False))
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        if self.qk_norm:  # RMSNorm over each head's q and k before RoPE (Qwen3)
            self.q_norm = LLaDARMSNorm(hd, config.rms_norm_eps)
            self.k_norm = LLaDARMSNorm(hd, config.rms_norm_eps)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, mlp, bias=False) if mlp else None  # gate (SiLU)
        self.up_proj = nn.Linear(d, mlp, bias=False) if mlp else None
        self.ff_out = nn.Linear(mlp, d, bias=False) if mlp else None  # down projection
        self.moe = LLaDAMoE(config) if moe else None

    def forward(
        self,
        x: torch.Tensor,  # (B, L, d)
        cos: torch.Tensor,  # (L, hd) fp32
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,  # (B, 1, 1 or L, L) bool, True = may be attended to
        is_causal: bool = False,
    ) -> torch.Tensor:
        """The block's output (B, L, d)."""
        B, L, _ = x.shape
        a = self.attn_norm(x)
        hq, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(a).view(B, L, hq, hd)  # (B, L, H, hd)
        k = self.k_proj(a).view(B, L, hkv, hd)  # (B, L, H_kv, hd)
        v = self.v_proj(a).view(B, L, hkv, hd).transpose(1, 2)  # (B, H_kv, L, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, L, hd), (B, H_kv, L, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if hkv != hq:
            # query head h reads kv head h // (hq / hkv) (grouped-query attention)
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=is_causal)
        h = x + self.attn_out(att.transpose(1, 2).reshape(B, L, hq * hd))
        m = self.ff_norm(h)
        if self.moe is not None:
            h = h + self.moe(m)
        if self.ff_proj is None:
            return h
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDATransformer(nn.Module):
    """Holds ``transformer`` (wte, blocks, ln_f, ff_out) so names read ``model.transformer.*``."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.embedding_size, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
                "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.embedding_size, bias=False),  # head
            }
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Logits (B, L, V) and, when asked, the input of every block plus the last output."""
        t, cfg = self.transformer, self.config
        B, L = input_ids.shape
        x = t.wte(input_ids)  # (B, L, d)
        scaling = getattr(cfg, "rope_scaling_params", None)
        # partial RoPE: the table spans head_dim x partial_rotary_factor features
        rotary = int(cfg.head_dim * float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0))
        cos, sin = rope_cos_sin(L, rotary, cfg.rope_theta, input_ids.device, scaling)
        key_mask = None
        if attention_mask is not None:
            # padding hides keys only; padded queries still attend to the real keys, so their
            # (unused) outputs stay finite as long as a row has one real token
            key_mask = attention_mask.bool().view(B, 1, 1, L)
        is_causal = bool(getattr(cfg, "causal", False))
        block = int(getattr(cfg, "block_size", 0) or 0)
        if block or (is_causal and key_mask is not None):
            pos = torch.arange(L, device=input_ids.device)
            allowed = torch.ones(L, L, dtype=torch.bool, device=pos.device)
            if is_causal:
                allowed = pos[None, :] <= pos[:, None]  # (L, L): key <= query
            if block:
                # a block-diffusion model: block-causal, blocks of ``block_size`` from position
                # 0, each seeing itself and the earlier blocks (its inference mask)
                allowed = allowed & (pos[None, :] // block <= pos[:, None] // block)
            if key_mask is not None:
                allowed = allowed & key_mask
            # every position keeps itself, so a padded query never has an empty row (NaN)
            key_mask = allowed | torch.eye(L, dtype=torch.bool, device=pos.device)
            is_causal = False
        hidden: list[torch.Tensor] = []
        for block in t.blocks:
            hidden.append(x)
            x = block(x, cos, sin, key_mask, is_causal)
        hidden.append(x)
        if getattr(cfg, "shift_logits", False):
            # row i predicts token i from the AR head's output at i-1; row 0 keeps its own
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        logits = t.ff_out(t.ln_f(x))  # (B, L, V)
        return logits, tuple(hidden) if output_hidden_states else None


class LLaDAPreTrainedModel(PreTrainedModel):
    """Weight init and loading hooks shared by the LLaDA classes."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LLaDABlock"]  # device_map="auto" keeps a block on one device
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only runs for weights missing from a checkpoint (or a model built from a config);
        # nn.init functions, because transformers 5 guards them against loaded weights.
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LLaDARMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LLaDAMoE):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(p, mean=0.0, std=std)
        elif isinstance(module, LLaDARouter):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.expert_bias)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """The mask predictor: ``model(input_ids, attention_mask).logits`` of shape (B, L, V).

    Bidirectional: every position sees every (non-padding) position. A padding
    ``attention_mask`` (1 = real token) masks keys only. A block-diffusion model
    (``config.block_size`` > 0) is block-causal: position i sees the blocks up to its own.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDATransformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) int64
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: object,
    ) -> MaskedLMOutput | tuple[torch.Tensor, ...]:
        """Logits (B, L, V) for every position (the model predicts masked ones)."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            # e.g. labels: the diffusion loss weights CE by 1/t, a plain MLM loss would mislead
            raise TypeError(f"LLaDAModelLM.forward does not take {unsupported}")
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        logits, hidden = self.model(input_ids, attention_mask, output_hidden_states)
        if return_dict is False:
            return (logits,) + ((hidden,) if hidden is not None else ())
        return MaskedLMOutput(logits=logits, hidden_states=hidden)
