"""``llada-eval``: accuracy and NFE on GSM8K-style jsonl (Hydra config ``conf/eval.yaml``).

    llada-eval model_path=runs/demo/sft/export data_path=../shared/data/gsm8k/test.jsonl limit=50
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from llada_train.cli.entry import hydra_entry
from llada_train.errors import exit_on_error
from llada_train.eval.answers import get_extractor
from llada_train.eval.config import EvalConfig, register_eval_configs, to_schema
from llada_train.eval.gsm8k import EvalReport, evaluate_generation, load_jsonl
from llada_train.eval.loading import load_for_inference

register_eval_configs()


def run(cfg: EvalConfig) -> EvalReport:
    """Evaluate, print accuracy and mean NFE, optionally write per-item predictions."""
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
