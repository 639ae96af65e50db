"""lm-evaluation-harness adapter (optional extra ``eval``): the model ``llada``.

``loglikelihood`` is the Monte Carlo bound of SPEC §6 (``conditional_log_likelihood``), or
the block NELBO for a block model (``config.block_size`` > 0, ``log_likelihood_bound``);
``loglikelihood_rolling`` (perplexity tasks such as wikitext) sums that bound over sliding
windows that score every token once (``eval/perplexity.py``);
``generate_until`` decodes with any configured sampler (``decode_batch``). lm_eval is
imported only when the harness model is built, so this module imports without it.

    python -m llada_train.eval.lm_eval_adapter --model llada \\
        --model_args model_path=runs/sft/export,method=low_confidence,gen_length=256 \\
        --tasks gsm8k --batch_size 8
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llada_train.diffusion.likelihood_block import log_likelihood_bound, model_block_size
from llada_train.errors import LladaError
from llada_train.eval.answers import get_extractor
from llada_train.eval.config import ModelSourceConfig
from llada_train.eval.decode import DECODERS, decode_batch, decode_config
from llada_train.eval.loading import load_for_inference
from llada_train.eval.perplexity import PerplexityConfig, corpus_elbo
from llada_train.sample import generate, left_pad
from llada_train.sample.block import block_generate

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'llada-train[eval]' (or pip install lm-eval)"


def _source_config(values: dict[str, Any]) -> ModelSourceConfig:
    """``ModelSourceConfig`` from model_args strings, converted and checked by OmegaConf."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(ModelSourceConfig), values)
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "a key"
        raise LladaError(f"lm_eval model_args {key}: {str(exc).splitlines()[0]}") from None


class LLaDAHarness:
    """The harness-facing logic, free of lm_eval types: text pairs in, numbers and text out.

    ``method`` picks the decode config (``conf/decode/<method>.yaml``); other keys are that
    method's settings or ``ModelSourceConfig`` fields.
    """

    def __init__(self, model_path: str, mc_num: int = 128, mc_batch_size: int = 32,
                 greedy_check: bool = True, batch_size: int | str = 8, seed: int = 0,
                 method: str = "low_confidence", ppl_window: int = 256, ppl_stride: int = 128,
                 **kwargs: Any) -> None:
        # chat_template is a nested node: model_args can only switch chat on/off
        source_keys = {f.name for f in dataclasses.fields(ModelSourceConfig)} - {"chat_template"}
        entry = DECODERS.get(method)  # an unknown method is reported by decode_config below
        defaults = vars(entry.config()) if entry else {}
        decode_keys = set(defaults)
        list_keys = {k for k, v in defaults.items() if isinstance(v, list)}
        src: dict[str, Any] = {"model_path": model_path}
        dec: dict[str, Any] = {"seed": seed}
        for key, value in kwargs.items():
            if key in decode_keys - {"method", "seed"}:
                # a list setting (hex block_lengths) is written 8;16;32 inside model_args
                is_list = key in list_keys and isinstance(value, str)
                dec[key] = value.replace(";", " ").split() if is_list else value
            elif key in source_keys:
                src[key] = value
            elif key in ("max_batch_size", "device_map"):  # harness extras we do not use
                continue
            else:
                raise LladaError(f"lm_eval model_args: unknown key {key!r} for method={method}")
        self.source = _source_config(src)
        self.decode_cfg = decode_config(method, **dec)
        self.bundle = load_for_inference(self.source)
        self.mc_num = int(mc_num)
        self.mc_batch_size = int(mc_batch_size)
        self.greedy_check = str(greedy_check).lower() in ("1", "true", "yes")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.device = next(self.bundle.model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        # the likelihood bound uses the method's CFG weight; methods without CFG score unguided
        self.ll_cfg_scale = float(getattr(self.decode_cfg, "cfg_scale", 0.0))
        self.ppl_cfg = PerplexityConfig(window=int(ppl_window), stride=int(ppl_stride),
                                        samples=self.mc_num, batch_size=self.mc_batch_size,
                                        seed=int(seed))

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, tokenized together so merges at the seam agree."""
        codec = self.bundle.codec
        ctx = codec.encode_prompt(context)
        whole = codec.encode_prompt(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, codec.encode(continuation)

    @torch.no_grad()
    def loglikelihood_pairs(self, pairs: list[tuple[str, str]], progress: bool = True) -> list[tuple[float, bool]]:
        """(log-likelihood bound, is_greedy) per (context, continuation)."""
        from tqdm.auto import tqdm

        out = []
        b = self.bundle
        for context, continuation in tqdm(pairs, desc="loglikelihood", disable=not progress):
            ctx, cont = self._split(context, continuation)
            ll = log_likelihood_bound(
                b.model, ctx, cont, mask_token_id=b.mask_token_id, generator=self.generator,
                n_samples=self.mc_num, batch_size=self.mc_batch_size, cfg_scale=self.ll_cfg_scale,
            )
            greedy = False
            if self.greedy_check:
                greedy = self._greedy(ctx, cont)
            out.append((ll, greedy))
        return out

    def _greedy(self, ctx: list[int], cont: list[int]) -> bool:
        """Whether one-token-per-step low-confidence decoding reproduces the continuation:
        over exactly its length, or block by block for a block model (which decodes whole
        blocks, so only the continuation's first tokens are compared)."""
        b = self.bundle
        prompt = torch.tensor([ctx], device=self.device)
        if model_block_size(b.model):
            res = block_generate(b.model, prompt, len(cont), mask_token_id=b.mask_token_id, stop_at_eos=False)
        else:
            res = generate(b.model, prompt, len(cont), len(cont), mask_token_id=b.mask_token_id)
        return res.generated[0, : len(cont)].tolist() == cont

    @torch.no_grad()
    def loglikelihood_rolling_texts(self, texts: list[str], progress: bool = True) -> list[float]:
        """Log-likelihood bound (nats) of each whole text: the sliding-window ELBO."""
        from tqdm.auto import tqdm

        b = self.bundle
        out = []
        for text in tqdm(texts, desc="loglikelihood_rolling", disable=not progress):
            ids = b.codec.encode(text)
            if not ids:
                out.append(0.0)
                continue
            rep = corpus_elbo(b.model, ids, self.ppl_cfg, b.mask_token_id)
            out.append(-rep.nll)
        return out

    @torch.no_grad()
    def generate_texts(self, requests: list[tuple[str, dict]], progress: bool = True) -> list[str]:
        """Completions cut at the first ``until`` string of each request."""
        from tqdm.auto import tqdm

        b = self.bundle
        results: list[str] = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=not progress)
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i : i + self.batch_size]
            ids, attn = left_pad([b.codec.encode_prompt(ctx) for ctx, _ in chunk], b.pad_token_id)
            res = decode_batch(
                b.model, ids.to(self.device), attn.to(self.device), self.decode_cfg,
                mask_token_id=b.mask_token_id, eos_token_id=b.eos_token_id, eot_token_id=b.eot_token_id,
                decode=b.codec.decode, extract=get_extractor("auto"), encode=b.codec.encode,
                generator=self.generator,
            )
            for (_, kwargs), text in zip(chunk, res.texts, strict=True):
                until = kwargs.get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                results.append(text)
            bar.update(len(chunk))
        bar.close()
        return results


def build_harness_class() -> type:
    """Import lm_eval, define and register the ``llada`` model class, and return it."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise LladaError(INSTALL_HINT) from None

    @register_model("llada")
    class LLaDAEvalHarness(LM):
        """lm-eval ``LM`` backed by ``LLaDAHarness``."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            self.core = LLaDAHarness(**kwargs)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return self.core.loglikelihood_pairs([r.args for r in requests])

        def loglikelihood_rolling(self, requests) -> list[float]:
            return self.core.loglikelihood_rolling_texts([r.args[0] for r in requests])

        def generate_until(self, requests) -> list[str]:
            return self.core.generate_texts([r.args for r in requests])

    return LLaDAEvalHarness


def main() -> None:
    """``python -m llada_train.eval.lm_eval_adapter <lm_eval CLI args>`` with ``--model llada``."""
    from llada_train.errors import exit_on_error

    @exit_on_error
    def _run() -> None:
        build_harness_class()
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()

    _run()


if __name__ == "__main__":
    main()
