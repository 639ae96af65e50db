"""Prompts with gold answers for RL (``llada-rl``): a JSONL file, rendered with the chat
template at start-up, and a reader whose batches are a pure function of the step.

A record is ``{"messages": [...]}`` (a dialogue; a final assistant turn is the gold answer
and is not part of the prompt) or ``{<prompt_field>: str, <answer_field>: str}`` (GSM8K's
``question`` / ``answer``). Prompt sets are small (thousands), so they are tokenised once
per rank instead of through an offline step.

Batch ``b`` (counting every micro-batch this rank has drawn) of ``inner_iterations`` x
``grad_accum`` consecutive ones repeats the same prompts: ESPO's inner iterations reuse one
rollout round. The prompts of (round, micro-batch, rank) are the global positions
``((round * A + micro) * W + rank) * B + [0, B)`` of a keyed per-epoch permutation, so the
reader's whole state is the count of batches drawn, and a resumed run reads the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llada_train.chat import ChatEncoder, ChatTemplate, validate_messages
from llada_train.data.jsonl import iter_jsonl_rows
from llada_train.errors import LladaError
from llada_train.keyed_random import derive_key, permute

_PROMPT_STREAM = 0x524C  # keeps the prompt order apart from other keyed streams


@dataclass
class RewardConfig:
    """One reward term: ``path`` names ``fn(completion: str, record: dict) -> float``."""

    path: str = "llada_train.rl.rewards:demo_exact_match"  # module:function or module.function
    weight: float = 1.0


@dataclass
class PromptDataConfig:
    """The RL task: prompts with gold answers, and how a completion is scored."""

    path: str = "runs/demo/data/rl_prompts.jsonl"  # JSONL records (see the module docstring)
    tokenizer: str | None = "runs/demo/data/tokenizer.json"
    prompt_field: str = "prompt"  # records without "messages": the question's field ...
    answer_field: str = "answer"  # ... and the gold answer's (passed to rewards as "answer")
    prompt_template: str = "{prompt}"  # how the question becomes the user turn
    system: str | None = None  # a system message before the user turn
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    limit: int | None = None  # first N records only
    # reward = sum of weight x fn(completion, record); exact-match accuracy is logged apart
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    accuracy: str = "llada_train.rl.rewards:demo_exact_match"  # 1/0 exact match, logged as rl/accuracy


@dataclass
class PromptSet:
    """Tokenised prompts and the records they came from (``answer`` set on each)."""

    prompt_ids: list[list[int]]
    records: list[dict[str, Any]]
    where: list[str]  # "<file> line N" of each record, for error lines

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _gold(row: dict[str, Any], cfg: PromptDataConfig, where: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, gold answer) of one record."""
    if "messages" in row:
        messages = validate_messages(row["messages"], where)
        answer = row.get(cfg.answer_field)
        if messages[-1]["role"] == "assistant":
            answer = answer if answer is not None else messages[-1]["content"]
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise LladaError(f"{where}: the prompt's last message must be a user turn")
    else:
        question = row.get(cfg.prompt_field)
        if not isinstance(question, str) or not question:
            raise LladaError(
                f"{where} has no string {cfg.prompt_field!r}: give 'messages' or set "
                "data.prompt_field to the question's field"
            )
        messages = [{"role": "user", "content": cfg.prompt_template.format(prompt=question)}]
        answer = row.get(cfg.answer_field)
    if not isinstance(answer, str):
        raise LladaError(
            f"{where} has no gold answer: give a string {cfg.answer_field!r} (data.answer_field) "
            "or end 'messages' with the assistant's answer"
        )
    if cfg.system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system}, *messages]
    return messages, answer


def load_prompt_set(cfg: PromptDataConfig, max_prompt_len: int) -> PromptSet:
    """Read and render ``cfg.path``; a prompt longer than ``max_prompt_len`` is one line."""
    from llada_train.tokenizer import load_tokenizer

    if not cfg.tokenizer:
        raise LladaError("data.tokenizer is required: RL prompts are rendered at start-up")
    chat = ChatEncoder(load_tokenizer(cfg.tokenizer), cfg.chat_template)
    out = PromptSet([], [], [])
    for lineno, row in iter_jsonl_rows(cfg.path):
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
        where = f"{cfg.path} line {lineno}"
        messages, answer = _gold(row, cfg, where)
        ids = chat.encode_prompt(messages)
        if len(ids) > max_prompt_len:
            raise LladaError(
                f"{where}: the prompt has {len(ids)} tokens, over the {max_prompt_len} left by "
                "trainer.seq_len - decode.gen_length: raise trainer.seq_len or drop the record"
            )
        out.prompt_ids.append(ids)
        out.records.append({**row, "answer": answer})
        out.where.append(where)
    if not len(out):
        raise LladaError(f"{cfg.path} holds no records: add prompts with gold answers")
    return out


class PromptReader:
    """This rank's prompt batches (see the module docstring for the order).

    ``next()`` gives ``input_ids`` (B, P) left-padded with ``pad_id``, ``attention_mask``
    (B, P), ``record_index`` (B,) and ``sample_index`` (B,), the global prompt position.
    """

    def __init__(
        self,
        prompts: PromptSet,
        micro_batch_size: int,
        grad_accum: int,
        inner_iterations: int,
        seed: int,
        rank: int,
        world_size: int,
        pad_id: int,
    ) -> None:
        self.prompts, self.batch, self.accum = prompts, micro_batch_size, grad_accum
        self.inner, self.seed, self.rank, self.world = inner_iterations, seed, rank, world_size
        self.pad_id = pad_id
        self.drawn = 0

    def positions(self, drawn: int) -> np.ndarray:
        """Global prompt positions (B,) of the ``drawn``-th micro-batch of this rank."""
        step, micro = divmod(drawn, self.accum)
        round_ = step // self.inner
        first = ((round_ * self.accum + micro) * self.world + self.rank) * self.batch
        return np.arange(first, first + self.batch, dtype=np.int64)

    def records_at(self, positions: np.ndarray) -> np.ndarray:
        """Record indices of global positions: a keyed permutation per epoch."""
        n = len(self.prompts)
        epochs, offsets = np.divmod(positions, n)
        out = np.empty_like(positions)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = permute(offsets[sel], n, derive_key(self.seed, e, _PROMPT_STREAM))
        return out

    def __iter__(self) -> PromptReader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        from llada_train.sample.common import left_pad

        positions = self.positions(self.drawn)
        records = self.records_at(positions)
        self.drawn += 1
        ids, attention = left_pad([self.prompts.prompt_ids[i] for i in records], self.pad_id)
        return {
            "input_ids": ids,  # (B, P)
            "attention_mask": attention,  # (B, P)
            "record_index": torch.from_numpy(records),  # (B,)
            "sample_index": torch.from_numpy(positions),  # (B,)
        }

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "records": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("records") != len(self.prompts):
            raise LladaError(
                f"the checkpoint's RL prompts had {state.get('records')} records, these have "
                f"{len(self.prompts)}: resume with the same data.path and data.limit"
            )
        self.drawn = int(state["drawn"])

