"""`blt prepare`: input files -> a directory of shards (blt/data/shards.py), in parallel,
deterministically, incrementally, and in parts on several machines.

    blt prepare corpus/ more/*.jsonl.gz --out data/corpus --workers 8
    blt prepare corpus/ --out data/corpus --part 1/4      # on four machines at once; the last to
    blt prepare corpus/ --out data/corpus --part 2/4      # finish writes the one manifest
    blt prepare corpus/ --out data/corpus --entropy-model runs/entropy --seq-len 1024   # + entropies

The inputs are grouped into shards in sorted path order, a new shard once a group holds
`shard_mb` of input, so the same inputs give the same shards whatever the number of workers.
Rerunning on a grown input set keeps every shard whose files are unchanged (same size and mtime)
and packs only the new and changed files. Each shard is written to temporary files and renamed;
its record, written last, marks it complete, so an interrupted run is finished by the next one
and a half-written shard is never read. A lock keeps a second writer out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from blt.data.documents import (
    HUB_PREFIX, DataError, describe, file_documents, hub_documents, read_input, resolve_files,
)
from blt.data.shards import (
    FORMAT, SPLITS, Shard, ShardWriter, check_format, dir_lock, read_record, write_json,
)
from blt.disk import make_dirs
from blt.tokens import encode_documents

SHARD_MB = 64  # input bytes per shard


class NoDataError(DataError):
    """The inputs were read, but hold no text, or no documents for one of the splits."""


@dataclass(frozen=True)
class Settings:
    """What decides the content of the shards besides the input files."""
    text_field: str = "text"  # column holding text in json/jsonl/parquet/hub data
    sample_by: str = "document"  # plain text: one document per file, paragraph or line
    val_fraction: float = 0.05  # share of each shard's documents held out for validation (1.0: all)
    seed: int = 0  # which documents are held out

    def check(self) -> None:
        if not 0.0 <= self.val_fraction <= 1.0:
            raise DataError(f"--val-fraction {self.val_fraction} is not in [0, 1]; pass e.g. --val-fraction 0.01")
        if self.sample_by not in ("document", "paragraph", "line"):
            raise DataError(f"--sample-by {self.sample_by!r} is not one of document, paragraph, line")


# ----------------------------------------------------------------------------- planning


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _group_id(settings: Settings, files: list[dict]) -> str:
    spec = {"format": FORMAT, "settings": asdict(settings),
            "files": [[f["path"], f["size"], f["mtime_ns"]] for f in files]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def plan(inputs: list[dict], old: list[Shard], settings: Settings, shard_bytes: int) -> list[tuple[str, list[dict]]]:
    """[(shard id, its files)] in order: the old shards whose files are all unchanged and still
    inputs, then the other inputs grouped in path order, a new group once one holds shard_bytes."""
    current = {f["path"]: f for f in inputs}
    kept, used = [], set()
    for s in old:
        if all(f["path"] in current and current[f["path"]]["size"] == f["size"]
               and current[f["path"]]["mtime_ns"] == f["mtime_ns"] for f in s.files):
            kept.append((s.id, [current[f["path"]] for f in s.files]))
            used.update(f["path"] for f in s.files)
    groups, group, size = [], [], 0
    for f in inputs:
        if f["path"] in used:
            continue
        group.append(f)
        size += f["size"]
        if size >= shard_bytes:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)
    made = [(_group_id(settings, g), g) for g in groups]
    return sorted(kept + made, key=lambda s: s[1][0]["path"])


# ----------------------------------------------------------------------------- building one shard


def _held_out(num_docs: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """True for a shard's validation documents: round(n * fraction) of them chosen by `rng`, at
    least one and not all when the shard has two or more (fraction 0: none; 1: all)."""
    is_val = np.zeros(num_docs, dtype=bool)
    if fraction >= 1.0:
        is_val[:] = True
    elif fraction > 0 and num_docs >= 2:
        k = min(num_docs - 1, max(1, round(num_docs * fraction)))
        is_val[rng.permutation(num_docs)[:k]] = True
    return is_val


def build_shard(root: Path, shard_id: str, files: list[dict], settings: Settings, hub_cache: Path) -> Shard:
    """Read, split, pack and write one shard; its record is written last."""
    docs, records = [], []
    for f in files:
        path = f["path"]
        if path.startswith(HUB_PREFIX):
            docs.extend(hub_documents(path[len(HUB_PREFIX):], settings.text_field, hub_cache))
            records.append({**f, "sha256": None})
            continue
        raw = read_input(Path(path))
        records.append({**f, "sha256": hashlib.sha256(raw).hexdigest()})
        docs.extend(file_documents(Path(path), raw, settings.text_field, settings.sample_by))
    data = np.concatenate([d for d, _ in docs]) if docs else np.zeros(0, np.uint8)  # (bytes,) all documents
    lengths = np.concatenate([n for _, n in docs]) if docs else np.zeros(0, np.int64)  # (docs,)
    rng = np.random.default_rng([settings.seed, int(shard_id[:15], 16)])
    is_val = _held_out(len(lengths), settings.val_fraction, rng)  # (docs,)
    per_byte = np.repeat(is_val, lengths)  # (bytes,)
    writers = {split: ShardWriter(root, shard_id, split) for split in SPLITS}
    try:
        for split, mask, byte_mask in (("val", is_val, per_byte), ("train", ~is_val, ~per_byte)):
            if mask.any():
                d, n = (data, lengths) if mask.all() else (data[byte_mask], lengths[mask])
                writers[split].write(encode_documents(d, n), n)
        splits = {split: w.finish() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    shard = Shard(shard_id, records, splits)
    write_json(root / "shards" / f"{shard_id}.json", shard.to_json(), indent=None)
    return shard


def _build_task(args) -> Shard:
    return build_shard(*args)


# ----------------------------------------------------------------------------- the whole prepare


def parse_part(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N; None -> (1, 1)."""
    if not text:
        return 1, 1
    try:
        k, n = (int(x) for x in text.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise DataError(f"--part {text!r} is not K/N with 1 <= K <= N; pass e.g. --part 1/4") from None
    return k, n


def _inputs(sources: list[str]) -> list[dict]:
    hub = [{"path": s, "size": 0, "mtime_ns": 0} for s in sources if s.startswith(HUB_PREFIX)]
    paths = [s for s in sources if not s.startswith(HUB_PREFIX)]
    return hub + [_stat(p) for p in (resolve_files(paths, "source") if paths else [])]


def _old_shards(root: Path, settings: Settings) -> list[Shard]:
    path = root / "manifest.json"
    if not path.is_file():
        return []
    manifest = json.loads(path.read_text())
    check_format(manifest, root)
    if manifest["settings"] != asdict(settings):
        diff = ", ".join(f"{k}={manifest['settings'].get(k)!r}" for k, v in asdict(settings).items()
                         if manifest["settings"].get(k) != v)
        raise DataError(f"'{root}' was prepared with {diff}; prepare with the same settings, or into another --out")
    return [Shard.from_json(s) for s in manifest["shards"]]


def _run(todo: list[tuple[str, list[dict]]], root: Path, settings: Settings, workers: int, progress: bool,
         log) -> None:
    """Build the shards of `todo` with `workers` processes, a progress bar with MB/s and ETA."""
    from tqdm import tqdm

    total = sum(f["size"] for _, files in todo for f in files)
    hub_cache = root / ".hf_cache"
    tasks = [(root, sid, files, settings, hub_cache) for sid, files in todo]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress, smoothing=0.1)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                bar.update(build_shard(*t).num_bytes)
        else:
            ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with ctx.Pool(min(workers, len(tasks))) as pool:
                for shard in pool.imap_unordered(_build_task, tasks):
                    bar.update(shard.num_bytes)
    finally:
        bar.close()


def _manifest(root: Path, settings: Settings, order: list[str], sources: list[str]) -> dict:
    shards = []
    for sid in order:
        s = read_record(root, sid)
        if s is None:
            raise DataError(f"shard {sid} of '{root}' is not complete; rerun `blt prepare` to finish it")
        shards.append(s)
    totals = {split: {"tokens": sum(s.splits[split]["tokens"] for s in shards),
                      "docs": sum(s.splits[split]["docs"] for s in shards)} for split in SPLITS}
    if totals["train"]["docs"] + totals["val"]["docs"] == 0:
        raise NoDataError(f"{describe(sources)} hold no text (empty files?); pass files with text")
    if 0 < settings.val_fraction < 1 and totals["val"]["docs"] == 0:
        raise NoDataError(f"{describe(sources)} hold too few documents to hold out validation (one per shard of "
                        f"two or more); pass separate validation data, or sample_by=paragraph for more documents")
    if settings.val_fraction < 1 and totals["train"]["docs"] == 0:
        raise NoDataError(f"{describe(sources)} hold no training documents; lower the validation fraction")
    return {"format": FORMAT, "settings": asdict(settings), "inputs": sources, **totals,
            "bytes": sum(s.num_bytes for s in shards), "shards": [s.to_json() for s in shards]}


def _sweep(root: Path, keep: set[str]) -> None:
    """Remove shard files no longer in the manifest, and temporary files of interrupted runs."""
    for p in (root / "shards").iterdir():
        if p.name.startswith(".") or p.name.split(".")[0] not in keep:
            p.unlink(missing_ok=True)


def prepare(sources: list[str], out: str | Path, settings: Settings = Settings(), workers: int = 1,
            part: str | None = None, shard_mb: float = SHARD_MB, progress: bool = False, log=print) -> dict:
    """Prepare `sources` (files, directories, globs, hub:NAME) into `out`; returns the manifest,
    or, for one part of several that are not all done yet, that part's record."""
    settings.check()
    k, n = parse_part(part)
    root = Path(out)
    if not sources:
        raise DataError("no sources to prepare; pass files, directories, globs or hub:NAME")
    inputs = _inputs(sources)
    try:
        made = make_dirs(root / "shards")
    except OSError as e:
        raise DataError(f"--out '{root}' cannot be created ({e.strerror or type(e).__name__}); "
                        f"pass a writable directory") from None
    try:
        return _prepare(inputs, sources, root, settings, workers, k, n, shard_mb, progress, log)
    except BaseException as e:
        if made and not (root / "manifest.json").exists() and (
                isinstance(e, NoDataError) or not list((root / "shards").glob("*.json"))):
            shutil.rmtree(made[0], ignore_errors=True)  # a first run that finished nothing of use leaves nothing
        raise


def _prepare(inputs: list[dict], sources: list[str], root: Path, settings: Settings, workers: int, k: int, n: int,
             shard_mb: float, progress: bool, log) -> dict:
    t0 = time.perf_counter()
    with dir_lock(root, ".lock" if n == 1 else f".lock-part-{k}-of-{n}"):
        old = _old_shards(root, settings)
        groups = plan(inputs, old, settings, int(shard_mb * 2**20))
        mine = [g for i, g in enumerate(groups) if i % n == k - 1]
        todo = [g for g in mine if read_record(root, g[0]) is None]
        todo_bytes = sum(f["size"] for _, files in todo for f in files)
        if todo:
            log(f"prepare: {len(todo)} of {len(mine)} shards to build ({todo_bytes / 1e6:,.1f} MB of input) "
                f"with {min(workers, len(todo))} worker(s) -> {root}")
        _run(todo, root, settings, workers, progress, log)
        order = [sid for sid, _ in groups]
        if n == 1:
            manifest = _finish(root, settings, order, sources)
        else:
            make_dirs(root / "parts")
            record = {"part": k, "of": n, "order": order, "inputs": sources}
            write_json(root / "parts" / f"part-{k}-of-{n}.json", record)
    if n > 1:
        with dir_lock(root, wait=True):
            return _combine(root, settings, n, record, log) or record
    secs = time.perf_counter() - t0
    log(f"prepare: {manifest['train']['docs']:,} train / {manifest['val']['docs']:,} val documents, "
        f"{manifest['bytes'] / 1e6:,.1f} MB in {len(order)} shards"
        + (f"; built {todo_bytes / 1e6:,.1f} MB at {todo_bytes / 1e6 / max(secs, 1e-9):,.1f} MB/s" if todo else
           "; nothing new to build") + f" -> {root}")
    return manifest


def _finish(root: Path, settings: Settings, order: list[str], sources: list[str]) -> dict:
    """Write the manifest of the shards `order` and sweep the rest (the caller holds the lock)."""
    manifest = _manifest(root, settings, order, sources)
    write_json(root / "manifest.json", manifest, indent=None)  # compact: it lists every input file
    _sweep(root, set(order))
    shutil.rmtree(root / ".hf_cache", ignore_errors=True)
    return manifest


def _combine(root: Path, settings: Settings, n: int, record: dict, log) -> dict | None:
    """When every part of n has finished, write the one manifest (the last part to finish does;
    the caller holds the directory's lock)."""
    parts = []
    for i in range(1, n + 1):
        p = root / "parts" / f"part-{i}-of-{n}.json"
        if not p.is_file():
            log(f"prepare: part {record['part']}/{n} done; the manifest is written when all {n} parts are")
            return None
        parts.append(json.loads(p.read_text()))
    if any(p["order"] != record["order"] for p in parts):
        raise DataError(f"the parts of '{root}' were planned from different inputs; run every --part with the "
                        f"same sources (and the same settings)")
    manifest = _finish(root, settings, record["order"], record["inputs"])
    for i in range(1, n + 1):
        (root / "parts" / f"part-{i}-of-{n}.json").unlink(missing_ok=True)
    log(f"prepare: all {n} parts done: {manifest['train']['docs']:,} train / {manifest['val']['docs']:,} val "
        f"documents, {manifest['bytes'] / 1e6:,.1f} MB in {len(record['order'])} shards -> {root}")
    return manifest
