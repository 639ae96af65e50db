"""Answer extraction: GSM8K ``#### n`` / last number and ``\\boxed{}``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llada_train.errors import LladaError
from llada_train.eval.answers import (
    extract_auto,
    extract_boxed,
    extract_gsm8k,
    get_extractor,
    last_number,
    normalize_number,
)

GSM8K_TEST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"


def test_gsm8k_reference_answers_give_the_gold_number():
    if not GSM8K_TEST.exists():
        pytest.skip(f"GSM8K test set not found at {GSM8K_TEST} (shared data not mounted)")
    lines = GSM8K_TEST.read_text().splitlines()
    assert lines
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        gold = record["answer"].split("####")[-1].strip()  # e.g. "18", "1,600", "-3"
        got = extract_gsm8k(record["answer"])
        assert got is not None, f"line {n}: nothing extracted"
        assert float(got) == float(gold.replace(",", "")), f"line {n}: {got!r} != {gold!r}"
        # the reference rationale without its final line ends on some other number
        assert extract_gsm8k(record["answer"] + "\nThe answer is 123456789.") == got


def test_gsm8k_fallbacks():
    assert extract_gsm8k("She pays 3 * 4 = 12 dollars, then 12 + 1 = 13.") == "13"
    assert extract_gsm8k("#### 1,250\n") == "1250"
    assert extract_gsm8k("So the total is $2,000.00.") == "2000"
    assert extract_gsm8k("The change is -7 degrees") == "-7"
    assert extract_gsm8k("no numbers here") is None
    assert last_number("0.50 and .5") == "0.5"


def test_boxed_and_auto():
    assert extract_boxed(r"thus \boxed{42}.") == "42"
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert extract_boxed(r"\boxed{ 1,000 }") == "1000"
    assert extract_boxed("no box 5") is None
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_auto(r"x = 3 so \boxed{7} and 9") == "7"
    assert extract_auto("x = 3 so 9") == "9"


def test_normalize_and_registry():
    assert normalize_number("007") == "7"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("3.140") == "3.14"
    assert normalize_number("abc") is None
    assert get_extractor("gsm8k") is extract_gsm8k
    with pytest.raises(LladaError):
        get_extractor("nope")
