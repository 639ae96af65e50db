"""A procedurally generated corpus and chat set a ~1M-parameter model learns in minutes on CPU.

Everything is lower case with punctuation split off by spaces, built from a few
templates with small arithmetic, colours, animal sounds and legs, so a tiny model's loss
falls visibly and its completions ("tom has 3 apples . mia gives him 4 more . now tom
has 7 apples .") can be checked by eye. Deterministic by seed; no network, no files read.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llada_train.errors import LladaError, exit_on_error

NAMES = {
    "tom": "him",
    "sam": "him",
    "ben": "him",
    "max": "him",
    "leo": "him",
    "mia": "her",
    "lily": "her",
    "anna": "her",
    "zoe": "her",
    "emma": "her",
}
SUBJECT = {"him": "he", "her": "she"}
OBJECTS = ["apples", "pears", "cookies", "books", "balls", "shells", "coins", "cards"]
FOOD = ["apples", "pears", "cookies"]
COLOURS = {
    "the sky": "blue",
    "the grass": "green",
    "the sun": "yellow",
    "snow": "white",
    "the night": "black",
    "a banana": "yellow",
    "the sea": "blue",
    "a leaf": "green",
    "coal": "black",
    "milk": "white",
    "a strawberry": "red",
    "a tomato": "red",
}
ANIMALS = {
    "cow": ("moo", "four"),
    "dog": ("woof", "four"),
    "cat": ("meow", "four"),
    "duck": ("quack", "two"),
    "sheep": ("baa", "four"),
    "pig": ("oink", "four"),
    "owl": ("hoo", "two"),
    "lion": ("roar", "four"),
    "hen": ("cluck", "two"),
    "frog": ("ribbit", "four"),
}
PLACES = ["park", "farm", "zoo", "beach", "shop", "forest"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _a(noun: str) -> str:
    """Noun with its indefinite article ("an owl", "a cow")."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(sorted(NAMES), 2)
    return a, b


def _add_story(rng: random.Random) -> str:
    a, b = _two_names(rng)
    x, y, obj = rng.randint(0, 10), rng.randint(1, 10), rng.choice(OBJECTS)
    return f"{a} has {x} {obj} . {b} gives {NAMES[a]} {y} more . now {a} has {x + y} {obj} ."


def _sub_story(rng: random.Random) -> str:
    a = rng.choice(sorted(NAMES))
    obj = rng.choice(OBJECTS)
    x = rng.randint(1, 20)
    y = rng.randint(1, x)
    verb = "eats" if obj in FOOD else "loses"
    return (
        f"{a} has {x} {obj} . {SUBJECT[NAMES[a]]} {verb} {y} of them . now {a} has {x - y} {obj} ."
    )


def _sum_fact(rng: random.Random) -> str:
    x, y = rng.randint(0, 10), rng.randint(0, 10)
    if rng.random() < 0.5:
        return f"{x} plus {y} is {x + y} ."
    x, y = max(x, y), min(x, y)
    return f"{x} minus {y} is {x - y} ."


def _colour_fact(rng: random.Random) -> str:
    thing = rng.choice(sorted(COLOURS))
    return f"{thing} is {COLOURS[thing]} ."


def _animal_fact(rng: random.Random) -> str:
    animal = rng.choice(sorted(ANIMALS))
    sound, legs = ANIMALS[animal]
    if rng.random() < 0.5:
        return f"{_a(animal)} says {sound} ."
    return f"{_a(animal)} has {legs} legs ."


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 6)
    return " ".join(WORDS[start : start + rng.randint(3, 5)]) + " ."


def _visit_story(rng: random.Random) -> str:
    a = rng.choice(sorted(NAMES))
    place, animal = rng.choice(PLACES), rng.choice(sorted(ANIMALS))
    sound = ANIMALS[animal][0]
    he = SUBJECT[NAMES[a]]
    return (
        f"{a} went to the {place} . at the {place} {he} saw {_a(animal)} . "
        f"the {animal} said {sound} . {a} was happy ."
    )


SENTENCES = [_add_story, _sub_story, _sum_fact, _colour_fact, _animal_fact, _counting, _visit_story]


def generate_documents(num_documents: int = 6000, seed: int = 0) -> list[str]:
    """``num_documents`` short documents of 2-5 templated sentences each."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(SENTENCES)(rng) for _ in range(rng.randint(2, 5)))
        for _ in range(num_documents)
    ]


def _arith_turn(rng: random.Random, x: int | None = None) -> tuple[str, str, int]:
    """One arithmetic question/answer; ``x`` continues from an earlier answer."""
    first = x is None
    x = rng.randint(0, 10) if first else x
    if rng.random() < 0.5:
        y = rng.randint(0, 10)
        q, r = f"{x} plus {y}", x + y
    else:
        y = rng.randint(0, x)
        q, r = f"{x} minus {y}", x - y
    ask = f"what is {q} ?" if first else f"and what is {q} ?"
    return ask, f"{q} is {r} .", r


# How an assistant turn answers: "sentence" restates the question ("a duck says quack ."),
# "short" names only the asked-for part after "it" ("it says quack ."), so a ~1M-parameter
# model need not copy the question's subject back (which it does not learn in the demo's
# budget); the lead "it" keeps the answer word a whole BPE token (" quack", not "qu ack").
ANSWER_STYLES = ("sentence", "short")


def _answer(style: str, sentence: str, short: str) -> str:
    return sentence if style == "sentence" else short


def _dialogue(rng: random.Random, answers: str = "sentence") -> list[dict[str, str]]:
    """A 1-3 turn dialogue; later turns refer back to earlier ones (multi-turn context).

    Both answer styles draw the same random numbers: a seed gives the same questions."""
    turns = rng.choice([1, 1, 2, 3])
    kind = rng.choice(["arith", "animal", "colour", "story"])
    msgs: list[dict[str, str]] = []
    value = None
    animals = rng.sample(sorted(ANIMALS), 3)
    things = rng.sample(sorted(COLOURS), 3)
    ask_sound = rng.random() < 0.5  # one question type per dialogue so follow-ups make sense
    for k in range(turns):
        if kind == "arith":
            q, a, value = _arith_turn(rng, value)
            a = _answer(answers, a, f"it is {value} .")
        elif kind == "animal":
            animal = animals[k]
            sound, legs = ANIMALS[animal]
            if ask_sound:
                q = f"what does {_a(animal)} say ?" if k == 0 else f"what about {_a(animal)} ?"
                a = _answer(answers, f"{_a(animal)} says {sound} .", f"it says {sound} .")
            else:
                q = f"how many legs does {_a(animal)} have ?" if k == 0 else f"and {_a(animal)} ?"
                a = _answer(answers, f"{_a(animal)} has {legs} legs .", f"it has {legs} legs .")
        elif kind == "colour":
            thing = things[k]
            q = f"what colour is {thing} ?" if k == 0 else f"and {thing} ?"
            a = _answer(answers, f"{thing} is {COLOURS[thing]} .", f"it is {COLOURS[thing]} .")
        else:
            name, other = _two_names(rng)
            obj = rng.choice(OBJECTS)
            x, y = rng.randint(0, 10), rng.randint(1, 10)
            q = f"{name} has {x} {obj} and {other} gives {NAMES[name]} {y} more . how many {obj} does {name} have ?"
            a = _answer(answers, f"{name} has {x + y} {obj} .", f"it is {x + y} .")
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def generate_dialogues(
    num_dialogues: int = 3000, seed: int = 0, answers: str = "sentence"
) -> list[list[dict[str, str]]]:
    """Chat dialogues as lists of ``{"role", "content"}`` messages (user first, alternating);
    ``answers`` is one of ``ANSWER_STYLES``."""
    if answers not in ANSWER_STYLES:
        raise LladaError(
            f"answers={answers!r} is not an answer style; use one of {list(ANSWER_STYLES)}"
        )
    rng = random.Random(seed + 1_000_003)  # independent of the corpus stream
    return [_dialogue(rng, answers) for _ in range(num_dialogues)]


def write_corpus(
    out_dir: str | Path, num_documents: int = 6000, seed: int = 0, num_files: int = 4
) -> list[Path]:
    """Write the corpus as ``num_files`` .txt files, one document per line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = generate_documents(num_documents, seed)
    paths = []
    for i in range(num_files):
        p = out / f"part-{i:02d}.txt"
        p.write_text("\n".join(docs[i::num_files]) + "\n")
        paths.append(p)
    return paths


def write_chat(
    path: str | Path, num_dialogues: int = 3000, seed: int = 0, answers: str = "sentence"
) -> Path:
    """Write the demo chat set as ``{"messages": [...]}`` jsonl."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        for msgs in generate_dialogues(num_dialogues, seed, answers):
            f.write(json.dumps({"messages": msgs}) + "\n")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m data_pipelines.demo_corpus --out DIR`` writes corpus/ and chat.jsonl."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--documents", type=int, default=6000)
    ap.add_argument("--dialogues", type=int, default=3000)
    ap.add_argument("--answers", choices=ANSWER_STYLES, default="sentence")
    args = ap.parse_args(argv)
    write_corpus(Path(args.out) / "corpus", args.documents, args.seed)
    write_chat(Path(args.out) / "chat.jsonl", args.dialogues, args.seed, args.answers)


if __name__ == "__main__":
    main()
