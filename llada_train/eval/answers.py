"""Final-answer extractors for math evaluation: GSM8K ``#### n`` / last number, ``\\boxed{}``."""

from __future__ import annotations

import re
from collections.abc import Callable

from llada_train.errors import LladaError

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number: no ``$`` or thousands commas, no trailing zeros/period.

    ``"1,600"``, ``"$1600.00"`` and ``"1600."`` all become ``"1600"``; None when ``text``
    is not a number.
    """
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    neg = s.startswith("-")
    digits = s.lstrip("-").lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return f"-{digits}" if neg and digits != "0" else digits


def last_number(text: str) -> str | None:
    """The last number written in ``text``, normalised; None if there is none."""
    found = _NUMBER.findall(text)
    for candidate in reversed(found):
        n = normalize_number(candidate)
        if n is not None:
            return n
    return None


def extract_gsm8k(text: str) -> str | None:
    """GSM8K answer: the number after the last ``####``, else the last number in the text."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        n = last_number(tail.split("\n", 1)[0]) or last_number(tail)
        if n is not None:
            return n
    return last_number(text)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed); numbers are normalised."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[i:j].strip()
                return normalize_number(content) or content
    return None


def extract_auto(text: str) -> str | None:
    """``\\boxed{}`` when present, otherwise the GSM8K rule."""
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_gsm8k(text)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "auto": extract_auto,
    "last_number": last_number,
}


def get_extractor(name: str) -> Callable[[str], str | None]:
    """The extractor registered under ``name`` (gsm8k, boxed, auto, last_number)."""
    if name not in EXTRACTORS:
        raise LladaError(f"answer extractor {name!r} is unknown; use one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]
