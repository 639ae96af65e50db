"""Reward plug-ins for ``llada-rl``: ``fn(completion: str, record: dict) -> float``.

``completion`` is the decoded answer (cut at the first EOS/EoT); ``record`` is the prompt's
JSONL record with its gold answer under ``"answer"``. A reward is named in the config by a
dotted path (``module:function`` or ``module.function``), so a user's own module plugs in
without touching this package.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from llada_train.errors import LladaError
from llada_train.eval.answers import extract_gsm8k

RewardFn = Callable[[str, dict[str, Any]], float]
_FINAL_ANSWER = re.compile(r"####\s*-?\$?[\d.,]*\d")


def gsm8k_exact_match(completion: str, record: dict[str, Any]) -> float:
    """1 when the completion's final number (after ``####``, else its last number) equals
    the gold answer's (GSM8K's ``... #### 72``, or a bare number), else 0."""
    gold = extract_gsm8k(record["answer"])
    predicted = extract_gsm8k(completion)
    return float(gold is not None and predicted == gold)


def demo_exact_match(completion: str, record: dict[str, Any]) -> float:
    """1 when the completion is the demo's reference answer word for word (spaces at the
    ends ignored), else 0: the demo report's own test of a right answer."""
    return float(completion.strip() == record["answer"].strip())


def gsm8k_format(completion: str, record: dict[str, Any]) -> float:
    """1 when the completion ends its reasoning with GSM8K's ``#### <number>`` line, else 0
    (right or wrong): a shaping term beside the exact match."""
    return float(_FINAL_ANSWER.search(completion) is not None)


def load_reward(path: str) -> RewardFn:
    """The function named by ``path``; a path that does not import or name a callable is
    one line saying which."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise LladaError(
            f"reward {path!r} is not a dotted path: write module:function, e.g. "
            "llada_train.rl.rewards:gsm8k_exact_match"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise LladaError(
            f"reward {path!r} does not import ({type(exc).__name__}: {exc}): check the module "
            "is installed and the function's name"
        ) from None
    if not callable(fn):
        raise LladaError(f"reward {path!r} is not callable: name a function(completion, record)")
    return fn


def score(fn: RewardFn, path: str, completion: str, record: dict[str, Any], where: str) -> float:
    """``fn(completion, record)`` as a float; a reward that raises or returns a non-number
    is one line naming the reward and the record."""
    try:
        value = fn(completion, record)
        return float(value)
    except Exception as exc:  # a user's plug-in: any failure ends as one line
        raise LladaError(
            f"reward {path} failed on {where} ({type(exc).__name__}: {exc}): fix the reward "
            "or the record"
        ) from None
