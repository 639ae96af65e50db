"""Mixture-of-experts feed-forward: routers, stacked experts, aux-loss-free balancing.

The routed experts of a layer are three stacked tensors (``gate_proj``/``up_proj`` of shape
(E, d_ff, d), ``down_proj`` of shape (E, d, d_ff)), not a list of modules: tokens are sorted
by expert and each expert's run of rows is multiplied at once, by ``torch._grouped_mm`` where
the build has it and by a loop over the non-empty experts otherwise. Both give the same
outputs and gradients (tests/test_moe.py).

A router is a plain function in ``ROUTERS`` (``llada2``: LLaDA 2.x sigmoid scores with
group-limited top-k; ``lladamoe``: LLaDA-MoE softmax + bias). Its logits are fp32 whatever
the model's dtype. The expert bias (``router.expert_bias``) is a persistent fp32 buffer, not
a parameter: ZeRO-3 casts every parameter to the training dtype and partitions it, and bf16
would lose balancing updates (one step of 1e-3 is below half of bf16's spacing once |bias|
>= 0.5). A buffer is replicated on every rank, never cast by DeepSpeed, and sits in the state
dict under the same name; ``model.checkpoint.named_weights`` lists it with the parameters so
exports, loads and checkpoints carry it like a weight. ``update_expert_bias`` moves it after
each optimizer step from the expert load counted in the step's forward passes (aux-loss-free
balancing, Wang et al. 2024 / DeepSeek-V3): underloaded experts up, overloaded down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llada_train.errors import LladaError
from llada_train.model.config import ModelConfig

MOE_IMPLS = ("auto", "grouped_mm", "loop")


@dataclass(frozen=True)
class RouterSpec:
    """What a router needs besides its logits: k, the expert groups and the weight scale."""

    top_k: int
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0


def route_llada2(
    logits: torch.Tensor,  # (N, E) fp32
    bias: torch.Tensor,  # (E,) fp32
    spec: RouterSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA 2.x: s = sigmoid(logits); experts chosen on s + bias inside the ``topk_group``
    groups whose top-2 biased scores sum highest; weights are the unbiased s renormalised
    over the top-k, times ``scaling``. Returns weights (N, k) fp32 and experts (N, k)."""
    scores = torch.sigmoid(logits)  # (N, E)
    biased = scores + bias
    if spec.n_group > 1:
        n, e = biased.shape
        grouped = biased.view(n, spec.n_group, e // spec.n_group)  # (N, G, E/G)
        top2 = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
        keep = top2.topk(spec.topk_group, dim=-1).indices  # (N, topk_group)
        group_mask = torch.zeros_like(top2, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(e // spec.n_group, dim=1)  # (N, E)
        biased = biased.masked_fill(~expert_mask, float("-inf"))
    experts = biased.topk(spec.top_k, dim=-1).indices  # (N, k)
    weights = scores.gather(1, experts)  # (N, k) unbiased
    if spec.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * spec.scaling, experts


def route_lladamoe(
    logits: torch.Tensor,  # (N, E) fp32
    bias: torch.Tensor,  # (E,) fp32
    spec: RouterSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA-MoE: p = softmax(logits) + bias; the top-k biased values are both the choice and
    the weights, not renormalised (the released ``norm_topk_prob = False``; its
    ``routed_scaling_factor`` and groups are not read by the released code, nor here)."""
    biased = torch.softmax(logits, dim=-1) + bias  # (N, E)
    weights, experts = biased.topk(spec.top_k, dim=-1)
    return weights, experts


RouterFn = Callable[[torch.Tensor, torch.Tensor, RouterSpec], tuple[torch.Tensor, torch.Tensor]]
ROUTERS: dict[str, RouterFn] = {"llada2": route_llada2, "lladamoe": route_lladamoe}


class Router(nn.Module):
    """Router weight (E, d) and expert bias (E,), both applied in fp32."""

    # DeepSpeed's name for buffers it must keep fp32 (data_types.keep_in_fp32_modules="auto"):
    # honoured by zero.Init and by an engine whose config casts buffers (buffer_dtype)
    _keep_in_fp32_modules_strict = ["expert_bias"]

    def __init__(self, d_model: int, num_experts: int, kind: str, spec: RouterSpec) -> None:
        super().__init__()
        if kind not in ROUTERS:
            raise LladaError(
                f"model config: router={kind!r} is unknown; use one of {sorted(ROUTERS)}"
            )
        self.route, self.spec = ROUTERS[kind], spec
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        # a buffer, moved only by update_expert_bias: ZeRO-3 would partition a parameter and
        # store it in bf16. zero.Init makes torch.zeros bf16 inside its context: .float() after
        self.register_buffer("expert_bias", torch.zeros(num_experts).float())
        self.expert_bias: torch.Tensor  # (E,) fp32

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Router:  # type: ignore[override]
        # model.to(bf16) would round the bias to 8 bits of mantissa, below the size of one
        # balancing update: it stays fp32 whatever the model's dtype
        super()._apply(fn, recurse)
        if self.expert_bias.is_floating_point() and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (N, k) fp32 and expert ids (N, k) for tokens x (N, d)."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32 whatever x's dtype
        return self.route(logits, self.expert_bias.float(), self.spec)


def grouped_mm_usable(x: torch.Tensor, stacks: list[torch.Tensor]) -> bool:
    """True where ``torch._grouped_mm`` runs these operands: CPU (fp32/bf16; bf16 only under
    torch.compile), or CUDA bf16 on compute capability 9.0+; row strides multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # its compile-time (fake) kernel takes bf16 only, whatever the device
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.dtype not in (torch.float32, torch.bfloat16):
        return False
    return all((t.shape[-1] * t.element_size()) % 16 == 0 for t in [x, *stacks])


def experts_grouped(
    xs: torch.Tensor,  # (M, d) rows sorted by expert
    counts: torch.Tensor,  # (E,) int64 rows per expert
    gate: torch.Tensor,  # (E, F, d)
    up: torch.Tensor,  # (E, F, d)
    down: torch.Tensor,  # (E, d, F)
) -> torch.Tensor:
    """SwiGLU of every expert on its run of rows with three grouped matmuls; (M, d)."""
    offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's run
    h = F.silu(torch._grouped_mm(xs, gate.transpose(1, 2), offs=offs))  # (M, F)
    h = h * torch._grouped_mm(xs, up.transpose(1, 2), offs=offs)
    return torch._grouped_mm(h, down.transpose(1, 2), offs=offs)  # (M, d)


def experts_loop(
    xs: torch.Tensor,  # (M, d) rows sorted by expert
    counts: torch.Tensor,  # (E,) int64
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """The same as ``experts_grouped`` with one matmul triple per non-empty expert; (M, d)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):  # one host sync per layer
        if n == 0:
            continue
        rows = xs[start : start + n]  # (n, d)
        outs.append(F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e]))
        start += n
    return torch.cat(outs) if outs else xs.new_zeros(xs.shape)


def _in_backward() -> bool:
    # activation checkpointing re-runs the forward inside backward: its routing must not be
    # counted a second time
    return torch._C._current_graph_task_id() != -1


class MoEFeedForward(nn.Module):
    """The routed experts of one layer: router, stacked SwiGLU experts, load counter.

    A shared expert, when the config has one, is the block's own dense SwiGLU (``ff_proj``,
    ``up_proj``, ``ff_out``) added to this module's output by the block.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_ff: int,
        router: str,
        spec: RouterSpec,
        impl: str = "auto",
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if impl not in MOE_IMPLS:
            raise LladaError(f"model config: moe_impl={impl!r}; use one of {', '.join(MOE_IMPLS)}")
        self.num_experts, self.top_k, self.impl = num_experts, spec.top_k, impl
        self.bias_update_rate = bias_update_rate
        self.router = Router(d_model, num_experts, router, spec)
        self.gate_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.up_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        # tokens routed to each expert in this optimizer step's training passes (all micro-
        # batches); fp32 counts, zeroed by update_expert_bias. Not saved: a checkpoint is
        # written after the step that consumed it.
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)
        self.last_load: torch.Tensor | None = None  # (E,) the last step's load, for metrics

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> MoEFeedForward:  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.expert_load.dtype != torch.float32:  # counts above 256 are not exact in bf16
            self.expert_load = self.expert_load.float()
        return self

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        """Which expert kernel this call takes (``impl``: auto, grouped_mm or loop)."""
        if self.impl == "loop":
            return False
        usable = grouped_mm_usable(x, [self.gate_proj, self.down_proj])
        if self.impl == "grouped_mm" and not usable:
            raise LladaError(
                f"model config: moe_impl=grouped_mm, but torch._grouped_mm does not run "
                f"{x.dtype} on {x.device.type} here; use moe_impl=auto or loop"
            )
        return usable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's top-k experts; x and the output are (B, L, d)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        weights, experts = self.router(flat)  # (N, k) fp32, (N, k) int64
        ids = experts.reshape(-1)  # (N*k,)
        order = ids.argsort(stable=True)  # (N*k,) slots grouped by expert
        token = order // self.top_k  # (N*k,) the token each sorted slot serves
        counts = torch.bincount(ids, minlength=self.num_experts)  # (E,)
        if self.training and torch.is_grad_enabled() and not _in_backward():
            self.expert_load += counts.to(self.expert_load.dtype)
        xs = flat[token]  # (N*k, d)
        kernel = experts_grouped if self.use_grouped_mm(flat) else experts_loop
        ys = kernel(xs, counts, self.gate_proj, self.up_proj, self.down_proj)  # (N*k, d)
        ys = ys.float() * weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token, ys)  # (N, d)
        return out.to(x.dtype).view(shape)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE feed-forward modules of ``model`` in layer order (none for a dense model)."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@torch.no_grad()
def update_expert_bias(model: nn.Module) -> None:
    """After an optimizer step: sum each MoE layer's load over the data-parallel ranks,
    move its expert bias by ``rate * sign(mean load - load)``, and reset the counters.

    Every rank computes the same update from the all-reduced load on its own replica of the
    bias (a buffer, never partitioned), so the biases stay equal across ranks and ZeRO stages.
    A dense model does nothing.
    """
    layers = moe_layers(model)
    if not layers:
        return
    loads = torch.stack([m.expert_load for m in layers])  # (layers, E)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    for m, load in zip(layers, loads, strict=True):
        m.last_load = load.cpu()
        m.expert_load.zero_()
        if m.bias_update_rate > 0 and load.sum() > 0:
            bias = m.router.expert_bias  # (E,) fp32
            step = torch.sign(load.mean() - load).to(bias.device, torch.float32)
            bias.add_(m.bias_update_rate * step)


def expert_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer: the last step's expert load max/mean (1 = balanced) and the largest
    |expert bias|; keys ``moe/L{layer}/load_max_mean`` and ``moe/L{layer}/bias_absmax``."""
    out: dict[str, float] = {}
    for name, m in _named_layers(model):
        if m.last_load is not None and m.last_load.sum() > 0:
            out[f"moe/{name}/load_max_mean"] = float(m.last_load.max() / m.last_load.mean())
        # a buffer: whole on every rank, ZeRO-3 included
        out[f"moe/{name}/bias_absmax"] = float(m.router.expert_bias.abs().max())
    return out


def _named_layers(model: nn.Module) -> Iterator[tuple[str, MoEFeedForward]]:
    for name, m in model.named_modules():
        if isinstance(m, MoEFeedForward):
            parts = name.split(".")
            layer = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "blocks"), name)
            yield f"L{layer}", m


def build_moe(cfg: ModelConfig, layer: int) -> MoEFeedForward | None:
    """Layer ``layer``'s routed experts per the config, or None where the layer is dense."""
    if not cfg.is_moe_layer(layer):
        return None
    spec = RouterSpec(
        cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor
    )
    return MoEFeedForward(
        cfg.d_model,
        cfg.num_experts,
        cfg.moe_intermediate_size,
        cfg.router,
        spec,
        cfg.moe_impl,
        cfg.router_bias_update_rate,
    )
