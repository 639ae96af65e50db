"""lm-evaluation-harness adapter (optional extra ``eval``): the model ``llada``.

``loglikelihood`` is the Monte Carlo bound of SPEC §6 (``conditional_log_likelihood``);
``generate_until`` decodes with any configured sampler (``decode_batch``). lm_eval is
imported only when the harness model is built, so this module imports without it.

    python -m llada_train.eval.lm_eval_adapter --model llada \\
        --model_args model_path=runs/sft/export,method=low_confidence,gen_length=256,steps=256 \\
        --tasks gsm8k --batch_size 8
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from llada_train.diffusion.likelihood import conditional_log_likelihood
from llada_train.errors import LladaError
from llada_train.eval.answers import get_extractor
from llada_train.eval.config import ModelSourceConfig
from llada_train.eval.loading import load_for_inference
from llada_train.eval.methods import DecodeConfig, decode_batch
from llada_train.sample import generate, left_pad

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'llada-train[eval]' (or pip install lm-eval)"


def _coerce(value: Any, like: Any) -> Any:
    """Convert a model_args string to the type of a config default."""
    if not isinstance(value, str) or isinstance(like, str) or like is None:
        return value
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(like, list):
        return [int(v) for v in value.replace(";", " ").split()]
    return type(like)(value)


class LLaDAHarness:
    """The harness-facing logic, free of lm_eval types: text pairs in, numbers and text out."""

    def __init__(self, model_path: str, mc_num: int = 128, mc_batch_size: int = 32, greedy_check: bool = True,
                 batch_size: int | str = 8, seed: int = 0, **kwargs: Any) -> None:
        source_fields = {f.name: f.default for f in dataclasses.fields(ModelSourceConfig)}
        decode_fields = {f.name for f in dataclasses.fields(DecodeConfig)}
        decode_defaults = DecodeConfig()
        src: dict[str, Any] = {"model_path": model_path}
        dec: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in decode_fields:
                dec[key] = _coerce(value, getattr(decode_defaults, key))
            elif key in source_fields:
                src[key] = _coerce(value, source_fields[key])
            elif key in ("max_batch_size", "device_map"):  # harness extras we do not use
                continue
            else:
                raise LladaError(f"lm_eval model_args: unknown key {key!r}")
        self.source = ModelSourceConfig(**src)
        self.decode_cfg = DecodeConfig(**dec)
        self.bundle = load_for_inference(self.source)
        self.mc_num = int(mc_num)
        self.mc_batch_size = int(mc_batch_size)
        self.greedy_check = _coerce(greedy_check, True)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.device = next(self.bundle.model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

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
            ll = conditional_log_likelihood(
                b.model, ctx, cont, mask_token_id=b.mask_token_id, generator=self.generator,
                n_samples=self.mc_num, batch_size=self.mc_batch_size, cfg_scale=self.decode_cfg.cfg_scale,
            )
            greedy = False
            if self.greedy_check:
                # greedy = one-token-per-step low-confidence decoding reproduces the continuation
                res = generate(b.model, torch.tensor([ctx], device=self.device), len(cont), len(cont),
                               mask_token_id=b.mask_token_id)
                greedy = res.generated[0].tolist() == cont
            out.append((ll, greedy))
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
            raise NotImplementedError("llada: loglikelihood_rolling (perplexity) is not supported")

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
