"""Data for ``paper_mini.py``: a character vocabulary, tinyshakespeare windows, synthetic facts."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch

BOS, EOS, MASK = 0, 1, 2  # ids are configuration (SPEC §1): this tokenizer picks its own
OFFSET = 3
NAME_LETTERS = string.ascii_lowercase
NAME_LENGTH = 3
POEM_MARKS = "/<>"  # the couplet's line break and the two task prompts (not in the corpus)
FACT_ROW = 32  # BOS + the longest fact sentence (25 chars) + EOS padding


@dataclass
class CharVocab:
    """Characters -> ids after the three special ids."""

    chars: str

    @property
    def size(self) -> int:
        # a multiple of 8 keeps the head's matmul shapes friendly; the spare ids are never targets
        return -(-(OFFSET + len(self.chars)) // 8) * 8

    def encode(self, text: str) -> list[int]:
        return [OFFSET + self.chars.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(
            self.chars[t - OFFSET] if OFFSET <= t < OFFSET + len(self.chars) else "?" for t in ids
        )


def load_shakespeare(path: Path) -> tuple[str, CharVocab]:
    """The corpus and a vocabulary over its characters plus everything the facts use."""
    text = path.read_text(encoding="utf-8")
    chars = "".join(sorted(set(text) | set(NAME_LETTERS + " .")))
    # the poems' marks go last, so the ids of part 1 (issue 15) stay as they were
    chars += "".join(c for c in POEM_MARKS if c not in chars)
    return text, CharVocab(chars)


def split_ids(text: str, vocab: CharVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) id streams: the last 10% of the characters is held out."""
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:]


def random_windows(
    stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator
) -> torch.Tensor:
    """(batch, seq) rows: BOS then seq - 1 characters from uniformly random offsets."""
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=gen)
    body = torch.stack([stream[s : s + seq - 1] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), BOS), body], dim=1)


def test_windows(stream: torch.Tensor, count: int, seq: int) -> torch.Tensor:
    """(count, seq - 1) consecutive non-overlapping test windows (without BOS)."""
    n = min(count, len(stream) // (seq - 1))
    return stream[: n * (seq - 1)].view(n, seq - 1)


# --------------------------------------------------------------------------- reversal facts

PARENT, CHILD = "the parent of {} is {}.", "the child of {} is {}."


@dataclass
class Fact:
    """ "the parent of ``child`` is ``parent``" and, equivalently, "the child of ``parent`` is
    ``child``"; ``seen`` says which phrasing training shows: "parent", "child" or "both"."""

    child: str
    parent: str
    seen: str

    def sentence(self, phrasing: str) -> str:
        if phrasing == "parent":
            return PARENT.format(self.child, self.parent)
        return CHILD.format(self.parent, self.child)

    def query(self, phrasing: str, answer_chars: int = NAME_LENGTH + 1) -> tuple[str, str]:
        """(prompt, answer): the sentence split ``answer_chars`` from its end (by default the
        last name and the full stop)."""
        s = self.sentence(phrasing)
        return s[:-answer_chars], s[-answer_chars:]


def make_facts(n_per_group: int, seed: int) -> list[Fact]:
    """Three equal groups with distinct random names: seen as parent-phrasing only, as
    child-phrasing only (so both templates are known), and in both phrasings (so the
    equivalence of the two is in the data)."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < 6 * n_per_group:
        names.add("".join(rng.choice(NAME_LETTERS) for _ in range(NAME_LENGTH)))
    pool = sorted(names)
    rng.shuffle(pool)
    facts = []
    for i, seen in enumerate(
        ["parent"] * n_per_group + ["child"] * n_per_group + ["both"] * n_per_group
    ):
        facts.append(Fact(pool[2 * i], pool[2 * i + 1], seen))
    return facts


def fact_rows(facts: list[Fact], vocab: CharVocab) -> torch.Tensor:
    """(N, FACT_ROW) training rows: BOS + sentence + EOS padding, one per seen phrasing."""
    rows = []
    for f in facts:
        for phrasing in ("parent", "child"):
            if f.seen in (phrasing, "both"):
                ids = [BOS, *vocab.encode(f.sentence(phrasing))]
                rows.append(ids + [EOS] * (FACT_ROW - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def held_out_queries(
    facts: list[Fact], direction: str, answer_chars: int = NAME_LENGTH + 1
) -> list[tuple[str, str]]:
    """Queries on the one-phrasing facts: ``direction`` "forward" uses the phrasing seen in
    training, "reversed" the other one (never paired with that fact in training)."""
    out = []
    for f in facts:
        if f.seen == "both":
            continue
        other = "child" if f.seen == "parent" else "parent"
        out.append(f.query(f.seen if direction == "forward" else other, answer_chars))
    return out


# --------------------------------------------------------------------------- two-line poems

# the LLaDA paper's Table 4 in miniature: couplets of two lines, each line 3 words of 3 letters
WORDS = (
    "sun",
    "sea",
    "sky",
    "red",
    "old",
    "oak",
    "owl",
    "fox",
    "ash",
    "elm",
    "ice",
    "dew",
    "fog",
    "day",
    "eye",
    "ink",
)
LINE_LENGTH = 11  # "sun sea sky"
COUPLET, NEXT, PREVIOUS = "{} / {}.", "{} > {}.", "{} < {}."  # the poem; the two task prompts
POEM_ROW = 32  # BOS + 27 characters + EOS padding


@dataclass
class Poem:
    """Two lines; ``taught`` poems also appear in both task forms in training (they teach
    what ">" next line and "<" previous line mean), the others only as the couplet."""

    first: str
    second: str
    taught: bool

    def rows(self) -> list[str]:
        """The training sentences of this poem."""
        out = [COUPLET.format(self.first, self.second)]
        if self.taught:
            out += [NEXT.format(self.first, self.second), PREVIOUS.format(self.second, self.first)]
        return out


def make_poems(n_per_group: int, seed: int) -> list[Poem]:
    """``n_per_group`` taught and ``n_per_group`` held-out poems, all 4n lines distinct."""
    rng = random.Random(seed)
    lines: set[str] = set()
    while len(lines) < 4 * n_per_group:
        lines.add(" ".join(rng.choice(WORDS) for _ in range(3)))
    pool = sorted(lines)
    rng.shuffle(pool)
    return [Poem(pool[2 * i], pool[2 * i + 1], i < n_per_group) for i in range(2 * n_per_group)]


def poem_rows(poems: list[Poem], vocab: CharVocab) -> torch.Tensor:
    """(N, POEM_ROW) training rows: BOS + sentence + EOS padding."""
    rows = []
    for p in poems:
        for s in p.rows():
            ids = [BOS, *vocab.encode(s)]
            rows.append(ids + [EOS] * (POEM_ROW - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def poem_queries(poems: list[Poem], form: str) -> list[tuple[str, str]]:
    """(prompt, answer line) on the held-out poems. ``form``: "next" / "previous" are the
    paper's prompted queries ("line >" -> the next line, "line <" -> the previous one);
    "couplet" completes the poem as seen in training (given the first line)."""
    held = [p for p in poems if not p.taught]
    if form == "couplet":
        return [(COUPLET.format(p.first, "")[:-1], p.second) for p in held]
    if form == "next":
        return [(NEXT.format(p.first, "")[:-1], p.second) for p in held]
    return [(PREVIOUS.format(p.second, "")[:-1], p.first) for p in held]


def couplet_infill_rows(poems: list[Poem], vocab: CharVocab) -> tuple[torch.Tensor, list[str]]:
    """(N, POEM_ROW) held-out couplet rows with the first line masked, and the first lines:
    the reverse query in the form the diffusion objective trains (the right context given)."""
    rows, answers = [], []
    for p in poems:
        if p.taught:
            continue
        ids = [BOS, *vocab.encode(COUPLET.format(p.first, p.second))]
        ids[1 : 1 + LINE_LENGTH] = [MASK] * LINE_LENGTH
        rows.append(ids + [EOS] * (POEM_ROW - len(ids)))
        answers.append(p.first)
    return torch.tensor(rows, dtype=torch.long), answers
