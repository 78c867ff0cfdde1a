"""The data config -> prepared sources: one data path for everything. A prepared directory (from
`blt prepare`) is read as it is; files and globs are prepared into the cache by the same code
(blt/data/prepare.py), incrementally, the first time and whenever they change.

    corpus = prepare_data(cfg.data)                 # rank 0; other ranks: prepare_data(..., build=False)
    corpus.sources                                  # [stream.Source] weighted training sources
    corpus.val_tokens(max_bytes)                    # [(name, np.ndarray uint16)] validation ids per source

data.train (or the bundled Shakespeare) is one source named "train", validated on data.val when
given, else on its held-out documents; data.sources is a weighted mixture, each source validated
on its own held-out documents. A source of weight 0 is validated but not trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blt.config import DataConfig
from blt.data.documents import HUB_PREFIX, DataError, describe, file_documents, read_input, resolve_files
from blt.data.prepare import Settings, prepare
from blt.data.shards import FORMAT, Concat, Prepared
from blt.data.stream import Source
from blt.tokens import encode_documents

BUNDLED_DIR = Path(__file__).resolve().parent / "shakespeare"


@dataclass
class Corpus:
    sources: list[Source]  # training sources (weight > 0)
    val: list[tuple[str, Prepared, str]]  # (name, prepared dir, split) of each source's validation ids
    cached: dict[str, bool]  # per source name: prepared into the cache by blt (else a user's prepared dir)

    @property
    def train_bytes(self) -> int:
        return sum(s.data.totals("train")[0] for s in self.sources)

    @property
    def val_bytes(self) -> int:
        return sum(p.totals(split)[0] for _, p, split in self.val)

    def val_tokens(self, limit: int | None = None) -> list[tuple[str, Concat]]:
        """Each source's validation ids (the first `limit` + 1), read lazily from the shards."""
        return [(name, p.split_tokens(split, None if limit is None else limit + 1)) for name, p, split in self.val]


def _is_prepared(paths: list[str]) -> bool:
    return len(paths) == 1 and (Path(os.path.expanduser(paths[0])) / "manifest.json").is_file()


def _cached(paths: list[str], settings: Settings, cfg: DataConfig, what: str, build: bool, log) -> Prepared:
    """Files/globs (or hub:NAME) prepared into <cache>/data/<key>, updated when they change."""
    hub = [p for p in paths if p.startswith(HUB_PREFIX)]
    files = resolve_files([p for p in paths if not p.startswith(HUB_PREFIX)], what) if len(hub) < len(paths) else []
    spec = {"format": FORMAT, "inputs": hub + [str(f) for f in files], "settings": vars(settings)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(cfg.cache_dir or "~/.cache/blt"))
    out = cache / "data" / key
    if build:
        try:
            (cache / "data").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(
                f"data.cache_dir '{cache}' is not writable ({e.strerror or type(e).__name__}); set "
                "data.cache_dir=PATH to a writable directory"
            ) from None
        try:
            prepare(
                hub + [str(f) for f in files],
                out,
                settings,
                workers=cfg.workers or os.cpu_count() or 1,
                log=lambda s: log(f"data: {s.removeprefix('prepare: ')} [{what}]"),
            )
        except DataError as e:
            raise DataError(str(e) if str(e).startswith(what) else f"{what}: {e}") from None
    return Prepared.open(out, what)


def _source(
    paths: list[str], settings: Settings, cfg: DataConfig, what: str, build: bool, log
) -> tuple[Prepared, bool]:
    if _is_prepared(paths):
        return Prepared.open(os.path.expanduser(paths[0]), what), False
    return _cached(paths, settings, cfg, what, build, log), True


def prepare_data(cfg: DataConfig, log=print, build: bool = True) -> Corpus:
    """The configured data, prepared (build=True: files are prepared into the cache where needed;
    build=False: only opened, as the other ranks do once rank 0 has prepared them)."""

    def settings(val_fraction: float) -> Settings:
        return Settings(cfg.text_field, cfg.sample_by, val_fraction, cfg.seed)

    if cfg.sources:
        sources, val, cached = [], [], {}
        for i, s in enumerate(cfg.sources):
            data, cached[s.name] = _source(
                s.path, settings(cfg.val_fraction), cfg, f"data.sources[{i}] ({s.name})", build, log
            )
            if s.weight > 0:
                sources.append(Source(s.name, s.weight, data))
            val.append((s.name, data, "val"))
        return Corpus(sources, val, cached)
    if cfg.hub_dataset:
        train_paths = [HUB_PREFIX + cfg.hub_dataset]
    else:
        train_paths = cfg.train or [str(p) for p in sorted((BUNDLED_DIR / "train").glob("*.txt"))]
    val_paths = cfg.val or (
        [str(p) for p in sorted((BUNDLED_DIR / "val").glob("*.txt"))] if not (cfg.train or cfg.hub_dataset) else []
    )
    train, is_cached = _source(
        train_paths, settings(0.0 if val_paths else cfg.val_fraction), cfg, "data.train", build, log
    )
    held = _source(val_paths, settings(1.0), cfg, "data.val", build, log)[0] if val_paths else train
    if held.totals("val")[1] == 0:
        raise DataError(
            f"data.val ({describe(val_paths)}) holds no text (empty files?); point data.val at files with text"
            if val_paths
            else "data.train holds no validation documents; set data.val to held-out files, or raise data.val_fraction"
        )
    return Corpus([Source("train", 1.0, train)], [("train", held, "val")], {"train": is_cached})


def encode_files(patterns: list[str], text_field: str = "text", sample_by: str = "document") -> np.ndarray:
    """Files/globs -> one in-memory packed uint16 id stream (nothing cached); for `blt eval --data`."""
    files = resolve_files(list(patterns), "--data")
    parts = []
    for f in files:
        parts += [encode_documents(d, n) for d, n in file_documents(f, read_input(f), text_field, sample_by)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    if len(tokens) == 0:
        raise DataError(f"--data: {describe(files, 'hold')} no text; pass files with text")
    return tokens
