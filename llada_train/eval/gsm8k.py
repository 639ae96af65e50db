"""Generation accuracy on GSM8K-style jsonl (``question`` / ``answer`` with ``#### n``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llada_train.data.jsonl import iter_jsonl_rows
from llada_train.errors import LladaError
from llada_train.eval.decode import DecodeConfig, decode_batch
from llada_train.eval.text import TextCodec
from llada_train.sample import left_pad


def load_jsonl(path: str | Path, limit: int | None = None, fields: tuple[str, ...] = ()) -> list[dict]:
    """Records of a jsonl file (first ``limit``), checking that each has ``fields``."""
    records = []
    for n, rec in iter_jsonl_rows(path):
        missing = [k for k in fields if k not in rec]
        if missing:
            raise LladaError(f"{path} line {n}: missing field(s) {missing}")
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    return records


@dataclass
class EvalReport:
    """Accuracy and mean forward passes per question, plus every item."""

    correct: int
    total: int
    mean_nfe: float
    items: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@torch.no_grad()
def evaluate_generation(
    model: torch.nn.Module,
    codec: TextCodec,
    records: list[dict],
    cfg: DecodeConfig,
    *,
    extract: Callable[[str], str | None],
    mask_token_id: int,
    eos_token_id: int | None,
    eot_token_id: int | None = None,
    pad_token_id: int = 0,
    prompt_template: str = "{question}",
    question_field: str = "question",
    answer_field: str = "answer",
    batch_size: int = 8,
    progress: bool = True,
) -> EvalReport:
    """Decode every question with ``cfg`` and compare extracted answers with the gold ones.

    The gold answer is ``extract`` applied to the record's answer field (``#### n`` for GSM8K).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    items: list[dict] = []
    correct = 0
    nfe_total = 0
    bar = tqdm(total=len(records), desc=f"eval {cfg.method}", disable=not progress)
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        prompts = [codec.encode_prompt(prompt_template.format(**{question_field: r[question_field]})) for r in batch]
        ids, attn = left_pad(prompts, pad_token_id)  # pads are hidden by the attention mask
        result = decode_batch(
            model, ids.to(device), attn.to(device), cfg, mask_token_id=mask_token_id,
            eos_token_id=eos_token_id, eot_token_id=eot_token_id, decode=codec.decode,
            extract=extract, encode=codec.encode, generator=generator,
        )
        for rec, text, pred, nfe in zip(batch, result.texts, result.answers, result.row_nfe, strict=True):
            gold = extract(str(rec[answer_field]))
            ok = pred is not None and pred == gold
            correct += ok
            nfe_total += nfe
            items.append({"question": rec[question_field], "gold": gold, "pred": pred, "correct": ok,
                          "nfe": nfe, "completion": text})
        bar.update(len(batch))
        bar.set_postfix(acc=f"{correct / len(items):.3f}")
    bar.close()
    return EvalReport(correct, len(items), nfe_total / max(len(items), 1), items)
