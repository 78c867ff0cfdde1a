"""Shared fixtures for the three tiers (tests/unit: in process; tests/e2e: real `blt` processes;
tests/dist: several processes): tiny configs that train in seconds on 2 CPU cores, and the runs and
prepared sources that many tests only read, each made once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blt.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Shrinks configs/tiny.yaml and configs/entropy_tiny.yaml to seconds; the YAML files stay the source.
TINY_BLT = [
    "model.encoder.dim=32",
    "model.encoder.heads=2",
    "model.encoder.window=32",
    "model.decoder.dim=32",
    "model.decoder.heads=2",
    "model.decoder.window=32",
    "model.decoder.layers=1",
    "model.global_model.dim=48",
    "model.global_model.heads=2",
    "model.global_model.layers=2",
    "model.cross_attn_heads=2",
    "model.hash_buckets=512",
    "data.seq_len=64",
    "training.batch_size=4",
    "training.max_minutes=null",
    "eval.max_bytes=2048",
    "eval.every=0",
    "logging.every=1",
    "logging.progress=false",
    "schedule.warmup_steps=2",
    "logging.images=false",
    "logging.samples=0",
]
TINY_LM = [
    "model.lm.dim=32",
    "model.lm.heads=2",
    "model.lm.layers=1",
    "model.lm.window=32",
    "data.seq_len=64",
    "training.batch_size=4",
    "eval.max_bytes=2048",
    "eval.every=0",
    "logging.every=1",
    "logging.progress=false",
    "schedule.warmup_steps=2",
    "logging.images=false",
    "logging.samples=0",
]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def entropy_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny entropy model trained by the real CLI (8 steps on the bundled corpus)."""
    run = tmp_path_factory.mktemp("entropy") / "run"
    code = main(
        [
            "train",
            str(CONFIGS / "entropy_tiny.yaml"),
            f"run_dir={run}",
            f"data.cache_dir={cache_dir}",
            "training.steps=8",
            *TINY_LM,
        ]
    )
    assert code == 0
    return run


@pytest.fixture(scope="session")
def static_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny BLT with static patching trained 2 steps by the real CLI in a child process; copy it
    before changing it."""
    from badinput import run_blt

    run = tmp_path_factory.mktemp("static") / "run"
    out = run_blt(
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        f"data.cache_dir={cache_dir}",
        "patching.mode=static",
        *TINY_BLT,
        "training.steps=2",
    )
    assert out.returncode == 0, out.stderr.decode()
    return run


@pytest.fixture(scope="session")
def three(tmp_path_factory) -> list:
    """Three prepared sources of different sizes (the stream and mixture tests)."""
    from blt.data.prepare import prepare
    from blt.data.shards import Prepared

    import corpora

    root = tmp_path_factory.mktemp("three")
    dirs = []
    for i, (files, size) in enumerate([(30, 4000), (10, 3000), (4, 2000)]):
        src = corpora.make_corpus(root / f"src{i}", files, size, seed=i)
        prepare([str(src)], root / f"p{i}", shard_mb=0.03, log=corpora.quiet)
        dirs.append(Prepared.open(root / f"p{i}"))
    return dirs
