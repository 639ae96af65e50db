"""Reward plug-ins for the llada-rl tests, named by dotted path as a user's own would be."""

from __future__ import annotations

from typing import Any


def odd_word_count(completion: str, record: dict[str, Any]) -> float:
    """1 for an odd number of words: random completions of an untrained model disagree on it,
    so groups have a reward spread to train on."""
    return float(len(completion.split()) % 2)


def raises(completion: str, record: dict[str, Any]) -> float:
    """A reward with a bug."""
    raise ValueError("no answer field")
