"""Datasets of the shipped tasks, read from files beside this one (never the network): each YAML
names one of these as `custom_dataset`. lm_eval calls it with the task's metadata as keywords."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAYS = HERE.parents[1] / "data" / "shakespeare" / "val"  # blt/data/shakespeare/val: the held-out plays


def _jsonl(name: str) -> list[dict]:
    with open(HERE / "data" / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _splits(**splits: list[dict]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def colours(**metadata):
    return _splits(train=_jsonl("colours_train.jsonl"), test=_jsonl("colours_test.jsonl"))


def shakespeare_next_line(**metadata):
    return _splits(test=_jsonl("shakespeare_next_line.jsonl"))


def shakespeare_word_order(**metadata):
    return _splits(test=_jsonl("shakespeare_word_order.jsonl"))


def shakespeare_speaker(**metadata):
    return _splits(test=_jsonl("shakespeare_speaker.jsonl"))


def shakespeare_plays(**metadata):
    """The two held-out plays, one document each (as `blt eval --data FILE` reads each file)."""
    plays = [{"title": p.stem, "text": p.read_text(encoding="utf-8")} for p in sorted(PLAYS.glob("*.txt"))]
    return _splits(test=plays)
