"""Small generated corpora for the data tests (tests/e2e/test_prepare.py, tests/unit/test_stream.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def quiet(_msg):
    pass


def make_corpus(root: Path, files: int, size: int, seed: int = 0) -> Path:
    """`files` text files of about `size` bytes of varied words, one document each, plus a JSON lines
    file of short documents."""
    rng = np.random.default_rng(seed)
    words = [w.encode() for w in "the a of and to in is was he that it for on as with his by at from".split()]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        picks = rng.integers(0, len(words), size // 3)
        (root / f"doc_{i:04d}.txt").write_bytes(b" ".join(words[j] for j in picks)[:size] + b"\n")
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * (i % 7 + 1)}) + "\n" for i in range(50)))
    return root
