"""``llada-eval``: accuracy and NFE on GSM8K-style jsonl, or the ELBO perplexity of a corpus
(Hydra config ``conf/eval.yaml``).

    llada-eval model_path=runs/demo/sft/export data_path=../shared/data/gsm8k/test.jsonl limit=50
    llada-eval ... decode=hex decode.gen_length=256 decode.tokens_per_step=4
    llada-eval task=ppl model_path=runs/demo/pretrain/export data_path=heldout.txt ppl.window=128
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from llada_train.cli.entry import hydra_entry
from llada_train.errors import LladaError, exit_on_error
from llada_train.eval.answers import get_extractor
from llada_train.eval.config import EvalConfig, register_eval_configs, to_schema
from llada_train.eval.gsm8k import EvalReport, evaluate_generation, load_jsonl
from llada_train.eval.loading import load_for_inference
from llada_train.eval.perplexity import PerplexityReport, corpus_elbo, read_corpus

register_eval_configs()


def run_ppl(cfg: EvalConfig) -> PerplexityReport:
    """Print (and optionally write as json) the ELBO perplexity and bits per token."""
    bundle = load_for_inference(cfg)
    ids = read_corpus(cfg.data_path, bundle.codec.encode, bundle.eos_token_id, cfg.ppl.text_field)
    if cfg.limit:
        ids = ids[: cfg.limit]  # first N tokens
    rep = corpus_elbo(bundle.model, ids, cfg.ppl, bundle.mask_token_id, progress=cfg.progress)
    summary = {"task": "ppl", "perplexity": rep.perplexity, "bits_per_token": rep.bits_per_token,
               "nll": rep.nll, "tokens": rep.tokens, "windows": rep.windows}
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary) + "\n")
    print(f"task=ppl perplexity={rep.perplexity:.4f} bits_per_token={rep.bits_per_token:.4f} "
          f"tokens={rep.tokens} windows={rep.windows} (ELBO bound: an upper bound on perplexity)",
          flush=True)
    return rep


def run(cfg: EvalConfig) -> EvalReport | PerplexityReport:
    """Evaluate, print accuracy and mean NFE, optionally write per-item predictions."""
    if cfg.task == "ppl":
        return run_ppl(cfg)
    if cfg.task != "gsm8k":
        raise LladaError(f"task={cfg.task!r} is unknown; use gsm8k or ppl")
    extract = get_extractor(cfg.extractor)
    records = load_jsonl(cfg.data_path, cfg.limit, (cfg.question_field, cfg.answer_field))
    bundle = load_for_inference(cfg)
    report = evaluate_generation(
        bundle.model, bundle.codec, records, cfg.decode, extract=extract,
        mask_token_id=bundle.mask_token_id, eos_token_id=bundle.eos_token_id,
        eot_token_id=bundle.eot_token_id, pad_token_id=bundle.pad_token_id,
        prompt_template=cfg.prompt_template, question_field=cfg.question_field,
        answer_field=cfg.answer_field, batch_size=cfg.batch_size, progress=cfg.progress,
    )
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(item) + "\n" for item in report.items))
    print(
        f"method={cfg.decode.method} accuracy={report.accuracy:.4f} ({report.correct}/{report.total}) "
        f"mean_nfe={report.mean_nfe:.1f}",
        flush=True,
    )
    return report


@exit_on_error
def run_config(cfg: DictConfig) -> None:
    """Check the composed config against its schema (one-line errors, exit 2), then run."""
    run(to_schema(cfg))


main = hydra_entry("eval", run_config)


if __name__ == "__main__":
    main()
