"""Writes the data of the shipped lm-eval tasks (blt/harness/tasks/data/*.jsonl), deterministically:

    python -m blt.harness.make_tasks            # rewrite them (the test suite checks they are current)

- colours_{train,test}.jsonl: a fixed, made-up mapping of 40 objects to 4 colours (10 each),
  "the apple is blue." Training on colours_train.jsonl makes blt_colours learnable; before it,
  a model is at chance (25%).
- shakespeare_next_line.jsonl: a passage of a held-out play (blt/data/shakespeare/val) that ends
  inside a speech, and 4 candidate next lines: the true one and 3 lines of similar length from
  elsewhere in the same play.
- shakespeare_word_order.jsonl: the same passages; the true next line and 3 copies of it with
  the words shuffled (the same bytes: only word order tells them apart).
- shakespeare_speaker.jsonl: a passage that ends where a speech begins, and 4 candidate speakers:
  the true one and 3 other characters of the same play who do not speak in the passage (so the
  one who has just spoken, never the next speaker, is not offered as a trap), drawn as often as
  each speaks, as the true speakers are.
The plays are public domain (blt/data/shakespeare/README.md); the colour facts are written here.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from blt.data import BUNDLED_DIR

DATA = Path(__file__).resolve().parent / "tasks" / "data"
OBJECTS = (
    "apple river candle feather lantern pebble ribbon saddle basket kettle mirror button carpet bottle "
    "blanket helmet pillow shovel ladder hammer wagon anchor barrel bucket cradle dagger goblet harp "
    "jacket lemon marble needle orchard parrot quill rabbit tulip violin whistle zebra"
).split()
COLOURS = ["blue", "gold", "pink", "grey"]  # four letters each, so no choice is favoured by its length
PASSES = 8  # the training file holds the facts this many times, each pass in its own order
SPEAKER = re.compile(r"^[A-Z][A-Z .,'&-]*[A-Z]\.$")  # a speech's first line: "DON PEDRO."
CONTEXT_BYTES = 300  # about this much text before each question (cut at a line start)
ITEMS = 100  # questions per play and task


def colours() -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    shades = [c for c in COLOURS for _ in range(len(OBJECTS) // len(COLOURS))]
    rng.shuffle(shades)
    facts = [{"object": o, "colour": c, "label": COLOURS.index(c)} for o, c in zip(OBJECTS, shades)]
    train = []
    for _ in range(PASSES):
        order = list(facts)
        rng.shuffle(order)
        train += [{"text": f"the {f['object']} is {f['colour']}.", **f} for f in order]
    return train, facts


def _plays() -> list[tuple[str, list[str]]]:
    return [(p.stem, p.read_text(encoding="utf-8").split("\n")) for p in sorted((BUNDLED_DIR / "val").glob("*.txt"))]


def _context(lines: list[str], end: int) -> str:
    """The text of lines[:end] (each with its newline), keeping whole lines up to CONTEXT_BYTES."""
    out, size, i = [], 0, end
    while i > 0 and size + len(lines[i - 1]) + 1 <= CONTEXT_BYTES:
        i -= 1
        out.append(lines[i] + "\n")
        size += len(lines[i]) + 1
    return "".join(reversed(out))


def _speeches(lines: list[str]) -> list[tuple[int, str, int]]:
    """(line of the name, name, number of text lines) of every speech."""
    out = []
    for i, line in enumerate(lines):
        if SPEAKER.match(line) and (i == 0 or not lines[i - 1].strip()):
            n = 0
            while i + 1 + n < len(lines) and lines[i + 1 + n].strip():
                n += 1
            out.append((i, line[:-1], n))
    return out


def _choices(rng: random.Random, true: str, others: list[str]) -> tuple[list[str], int]:
    choices = [true] + (rng.sample(others, 3) if len(others) > 3 else others)
    rng.shuffle(choices)
    return choices, choices.index(true)


def next_line() -> list[dict]:
    rng, items = random.Random(1), []
    for play, lines in _plays():
        speeches = _speeches(lines)
        verse = [
            (i + 1 + k, lines[i + 1 + k])
            for i, _, n in speeches
            for k in range(n)
            if not lines[i + 1 + k].startswith("[") and len(lines[i + 1 + k]) >= 12
        ]
        spots = [
            (i + 1 + k)
            for i, _, n in speeches
            if n >= 2
            for k in range(1, n)
            if not lines[i + 1 + k].startswith("[") and len(lines[i + 1 + k]) >= 12
        ]
        for at in sorted(rng.sample(spots, ITEMS)):
            true = lines[at]
            far = [text for j, text in verse if abs(j - at) > 50 and text != true]
            near = sorted(far, key=lambda t: (abs(len(t) - len(true)), t))[:30]  # similar length: no length cue
            choices, label = _choices(rng, true, near)
            items.append({"play": play, "context": _context(lines, at), "choices": choices, "label": label})
    return items


def word_order(items: list[dict]) -> list[dict]:
    """The next-line questions again, but the 3 wrong lines are the true line with its words shuffled:
    the same bytes, so only the order of the words can tell them apart."""
    rng, out = random.Random(3), []
    for item in items:
        true = item["choices"][item["label"]]
        words = true.split(" ")
        if len(words) < 5:
            continue
        shuffled: list[str] = []
        while len(shuffled) < 3:
            w = list(words)
            rng.shuffle(w)
            line = " ".join(w)
            shuffled += [] if line == true or line in shuffled else [line]
        choices, label = _choices(rng, true, shuffled)
        out.append({"play": item["play"], "context": item["context"], "choices": choices, "label": label})
    return out


def speaker() -> list[dict]:
    rng, items = random.Random(2), []
    for play, lines in _plays():
        speeches = _speeches(lines)
        counts: dict[str, int] = {}
        for _, name, _ in speeches:
            counts[name] = counts.get(name, 0) + 1
        cast = sorted(n for n, c in counts.items() if c >= 10)  # characters who speak often
        spots = [(i, name) for i, name, _ in speeches if name in cast and i > 40]
        for at, name in sorted(rng.sample(spots, ITEMS)):
            context = _context(lines, at)
            spoke = {ln[:-1] for ln in context.split("\n") if SPEAKER.match(ln)}
            others = [c for c in cast if c != name and c not in spoke]  # none of them speaks in the passage
            picked: list[str] = []
            while len(picked) < 3:  # as often as each speaks: a guess that ignores the passage scores 25%
                c = rng.choices(others, weights=[counts[o] for o in others])[0]
                picked += [] if c in picked else [c]
            choices, label = _choices(rng, name + ".", [p + "." for p in picked])
            items.append({"play": play, "context": context, "choices": choices, "label": label})
    return items


def write(name: str, rows: list[dict]) -> Path:
    path = DATA / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build() -> dict[str, list[dict]]:
    train, test = colours()
    lines = next_line()
    return {
        "colours_train.jsonl": train,
        "colours_test.jsonl": test,
        "shakespeare_next_line.jsonl": lines,
        "shakespeare_word_order.jsonl": word_order(lines),
        "shakespeare_speaker.jsonl": speaker(),
    }


if __name__ == "__main__":
    for file, rows in build().items():
        print(f"{write(file, rows)}: {len(rows)} rows")
