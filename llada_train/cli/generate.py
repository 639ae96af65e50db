"""``llada-generate``: complete prompts with any sampler (Hydra config ``conf/generate.yaml``).

    llada-generate model_path=runs/demo/sft/export 'prompts=["2 plus 5 is"]' decode=med

Prompts with newlines: prompt_file=x.jsonl (one {"prompt": "..."} per line), or
prompt_escapes=true to read \\n in ``prompts`` as a newline.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from llada_train.cli.entry import hydra_entry
from llada_train.data.jsonl import iter_jsonl_rows
from llada_train.errors import LladaError, exit_on_error
from llada_train.eval.config import GenerateConfig, register_eval_configs, to_schema
from llada_train.eval.decode import decode_batch
from llada_train.eval.loading import load_for_inference
from llada_train.sample import left_pad

register_eval_configs()


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(prompt: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` as newline, tab and backslash; other backslashes stay."""
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m[1]], prompt)


def jsonl_prompts(path: Path) -> list[str]:
    """The ``prompt`` string of each line of a JSONL file (errors name the line)."""
    prompts = []
    for lineno, row in iter_jsonl_rows(path):
        if not isinstance(row.get("prompt"), str):
            raise LladaError(
                f"{path} line {lineno} has no \"prompt\" string: write one "
                '{"prompt": "..."} object per line'
            )
        prompts.append(row["prompt"])
    return prompts


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """``prompts`` (escapes decoded with ``prompt_escapes``) plus those of ``prompt_file``:
    a .jsonl file's ``prompt`` fields, or another file's non-empty lines."""
    prompts = [unescape(p) if cfg.prompt_escapes else p for p in cfg.prompts]
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.exists():
            raise LladaError(f"prompt_file {path} not found")
        if path.suffix == ".jsonl":
            prompts += jsonl_prompts(path)
        else:
            prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise LladaError(
            "no prompts: pass 'prompts=[\"...\"]' or prompt_file=<.jsonl of {\"prompt\": ...} "
            "lines, or a file with one prompt per line>"
        )
    return prompts


def run(cfg: GenerateConfig) -> list[str]:
    """Generate for every prompt, print prompt, completion and NFE; returns the completions."""
    prompts = read_prompts(cfg)
    bundle = load_for_inference(cfg)
    device = next(bundle.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.decode.seed)
    completions: list[str] = []
    total_nfe = 0
    for i in range(0, len(prompts), cfg.batch_size):
        batch = prompts[i : i + cfg.batch_size]
        ids, attn = left_pad([bundle.codec.encode_prompt(p) for p in batch], bundle.pad_token_id)
        result = decode_batch(
            bundle.model, ids.to(device), attn.to(device), cfg.decode,
            mask_token_id=bundle.mask_token_id, eos_token_id=bundle.eos_token_id,
            eot_token_id=bundle.eot_token_id, decode=bundle.codec.decode, extract=lambda _t: None,
            encode=bundle.codec.encode, generator=generator, progress=cfg.progress,
        )
        for prompt, text, nfe in zip(batch, result.texts, result.row_nfe, strict=True):
            print(f"### prompt: {prompt}\n{text}\n[nfe={nfe}]\n", flush=True)
            completions.append(text)
            total_nfe += nfe
    print(f"{len(prompts)} prompt(s), method={cfg.decode.method}, mean NFE {total_nfe / len(prompts):.1f}")
    return completions


@exit_on_error
def run_config(cfg: DictConfig) -> None:
    """Check the composed config against its schema (one-line errors, exit 2), then run."""
    run(to_schema(cfg))


main = hydra_entry("generate", run_config)


if __name__ == "__main__":
    main()
