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
and a half-written shard is never read; a shard whose files do not have the sizes of its record
is built again. A lock keeps a second writer out; only its holder creates or removes files.

--out is a new or empty directory, or one this command made: prepare removes only the files it
wrote (shards named in its records or manifest, its temporary files) and refuses a source that
holds --out or lies inside it.
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

from blt.config import DataConfig
from blt.data.documents import (
    HUB_PREFIX,
    DataError,
    describe,
    file_documents,
    hub_documents,
    read_input,
    resolve_files,
)
from blt.data.shards import (
    FORMAT,
    LOCK_FILE,
    SHARD_FILE,
    SPLITS,
    TEMP_FILE,
    Shard,
    ShardWriter,
    dir_lock,
    own_shard_ids,
    prepared_state,
    read_manifest,
    read_record,
    shard_damage,
    write_json,
)
from blt.disk import make_dirs, remove_made_dirs
from blt.tokens import encode_documents
from blt.typed import PosFloat, PosInt, Seed, check_option

SHARD_MB = 64  # input bytes per shard


class NoDataError(DataError):
    """The inputs were read, but hold no text, or no documents for one of the splits."""


@dataclass(frozen=True)
class Settings:
    """What decides the content of the shards besides the input files: data.* fields, with the
    data config's defaults."""

    text_field: str = DataConfig.text_field  # column holding text in json/jsonl/parquet/hub data
    sample_by: str = DataConfig.sample_by  # plain text: one document per file, paragraph or line
    val_fraction: float = DataConfig.val_fraction  # share of each shard's documents held out (1.0: all)
    seed: int = DataConfig.seed  # which documents are held out

    def check(self) -> None:
        if not 0.0 <= self.val_fraction <= 1.0:
            raise DataError(f"--val-fraction {self.val_fraction} is not in [0, 1]; pass e.g. --val-fraction 0.01")
        if self.sample_by not in ("document", "paragraph", "line"):
            raise DataError(f"--sample-by {self.sample_by!r} is not one of document, paragraph, line")
        check_option("seed", self.seed, Seed, flag=True)


# ----------------------------------------------------------------------------- planning


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _group_id(settings: Settings, files: list[dict]) -> str:
    spec = {
        "format": FORMAT,
        "settings": asdict(settings),
        "files": [[f["path"], f["size"], f["mtime_ns"]] for f in files],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def plan(inputs: list[dict], old: list[Shard], settings: Settings, shard_bytes: int) -> list[tuple[str, list[dict]]]:
    """[(shard id, its files)] in order: the old shards whose files are all unchanged and still
    inputs, then the other inputs grouped in path order, a new group once one holds shard_bytes."""
    current = {f["path"]: f for f in inputs}
    kept, used = [], set()
    for s in old:
        if all(
            f["path"] in current
            and current[f["path"]]["size"] == f["size"]
            and current[f["path"]]["mtime_ns"] == f["mtime_ns"]
            for f in s.files
        ):
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
            docs.extend(hub_documents(path[len(HUB_PREFIX) :], settings.text_field, hub_cache))
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


def check_options(settings: Settings, workers: int, shard_mb: float, part: str | None) -> tuple[int, int]:
    """Refuse a bad setting or option in one line before anything is read or written; returns (K, N)."""
    settings.check()
    check_option("workers", workers, PosInt, flag=True)
    check_option("shard_mb", shard_mb, PosFloat, flag=True)
    return parse_part(part)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _inputs(sources: list[str], root: Path) -> list[dict]:
    """The input files with their sizes and mtimes. A source holding --out or inside it is refused
    (a rerun would read its own shards), and so is a prepared directory (it is not input text)."""
    hub = [{"path": s, "size": 0, "mtime_ns": 0} for s in sources if s.startswith(HUB_PREFIX)]
    paths = [s for s in sources if not s.startswith(HUB_PREFIX)]
    out = os.path.realpath(root)
    for s in paths:
        real = os.path.realpath(os.path.expanduser(s))
        if os.path.isdir(real) and _inside(out, real):
            where = "is the source" if out == real else "lies inside the source"
            raise DataError(
                f"--out '{root}' {where} '{s}', whose files prepare reads; prepare into a directory outside the sources"
            )
    files = resolve_files(paths, "source") if paths else []
    for f in files:
        if _inside(os.path.realpath(f), out):
            raise DataError(
                f"the source '{f}' lies inside --out '{root}'; keep the sources outside the prepared "
                f"directory and pass another --out"
            )
    for d in sorted({f.parent for f in files}):
        for folder in (d, d.parent) if d.name == "shards" else (d,):
            state = prepared_state(folder)
            if state == "done":
                raise DataError(
                    f"'{folder}' is a prepared directory (from `blt prepare`), not input files; use it "
                    f"alone as a data path, or pass the files it was prepared from"
                )
            if state == "unfinished":
                raise DataError(
                    f"'{folder}' is the output of a `blt prepare` that did not finish (no manifest.json); "
                    f"rerun that `blt prepare` to finish it, then use the directory alone as a data path"
                )
    return hub + [_stat(p) for p in files]


def _old_shards(root: Path, settings: Settings) -> list[Shard]:
    if not (root / "manifest.json").exists():
        return []
    manifest, shards = read_manifest(root)
    if manifest["settings"] != asdict(settings):
        diff = ", ".join(
            f"{k}={manifest['settings'].get(k)!r}"
            for k, v in asdict(settings).items()
            if manifest["settings"].get(k) != v
        )
        raise DataError(f"'{root}' was prepared with {diff}; prepare with the same settings, or into another --out")
    return shards


def _check_out(root: Path, settings: Settings) -> None:
    """Refuse, before anything is created, an --out that is a file, a directory of other files, or a
    prepared directory whose manifest is damaged or was made with other settings."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DataError(f"--out '{root}' is a file; pass a directory")
    if (root / "manifest.json").exists():
        _old_shards(root, settings)
        return
    try:
        names = [p.name for p in root.iterdir()]
    except OSError as e:
        raise DataError(
            f"--out '{root}' cannot be read ({e.strerror or type(e).__name__}); pass another directory"
        ) from None
    if names and not any(LOCK_FILE.fullmatch(name) for name in names):
        raise DataError(
            f"--out '{root}' holds files but is not a prepared directory; pass a new or empty directory "
            f"(prepare writes only into its own)"
        )


def _complete(root: Path, shard_id: str, log) -> bool:
    """Whether a shard was finished and its files still have the sizes of its record."""
    shard = read_record(root, shard_id)
    if shard is not None and (damage := shard_damage(root, shard)):
        log(f"prepare: {damage}; building it again")
        return False
    return shard is not None


def _run(todo: list[tuple[str, list[dict]]], root: Path, settings: Settings, workers: int, progress: bool, log) -> None:
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
    totals = {
        split: {
            "tokens": sum(s.splits[split]["tokens"] for s in shards),
            "docs": sum(s.splits[split]["docs"] for s in shards),
        }
        for split in SPLITS
    }
    if totals["train"]["docs"] + totals["val"]["docs"] == 0:
        raise NoDataError(f"{describe(sources, 'hold')} no text (empty files?); pass files with text")
    if 0 < settings.val_fraction < 1 and totals["val"]["docs"] == 0:
        raise NoDataError(
            f"{describe(sources, 'hold')} too few documents to hold out validation (one per shard "
            f"of two or more); pass separate validation data, or sample_by=paragraph for more documents"
        )
    if settings.val_fraction < 1 and totals["train"]["docs"] == 0:
        raise NoDataError(f"{describe(sources, 'hold')} no training documents; lower the validation fraction")
    return {
        "format": FORMAT,
        "settings": asdict(settings),
        "inputs": sources,
        **totals,
        "bytes": sum(s.num_bytes for s in shards),
        "shards": [s.to_json() for s in shards],
    }


def _sweep(root: Path, stale: set[str]) -> None:
    """Remove the files of the shards `stale` (ids this command wrote, no longer in the manifest) and
    the temporary files of interrupted runs, by their exact names; any other file stays."""
    for folder in (root, root / "shards"):
        for p in folder.iterdir():
            m = SHARD_FILE.fullmatch(p.name) if folder != root else None
            if ((m and m["id"] in stale) or TEMP_FILE.fullmatch(p.name)) and p.is_file():
                p.unlink(missing_ok=True)


def _take_back(root: Path) -> None:
    """Remove what a failed first run wrote into root (its shards, then shards/ and its lock), holding
    the lock; a file it did not write stays, and so does the directory holding it."""
    for p in (root / "shards").iterdir():
        if (SHARD_FILE.fullmatch(p.name) or TEMP_FILE.fullmatch(p.name)) and p.is_file():
            p.unlink(missing_ok=True)
    shutil.rmtree(root / ".hf_cache", ignore_errors=True)
    try:
        (root / "shards").rmdir()
    except OSError:
        return
    (root / ".lock").unlink(missing_ok=True)  # a process that was waiting locks a new one (shards.dir_lock)


def prepare(
    sources: list[str],
    out: str | Path,
    settings: Settings = Settings(),
    workers: int = 1,
    part: str | None = None,
    shard_mb: float = SHARD_MB,
    progress: bool = False,
    log=print,
) -> dict:
    """Prepare `sources` (files, directories, globs, hub:NAME) into `out`; returns the manifest,
    or, for one part of several that are not all done yet, that part's record."""
    k, n = check_options(settings, workers, shard_mb, part)
    root = Path(out)
    if not sources:
        raise DataError("no sources to prepare; pass files, directories, globs or hub:NAME")
    inputs = _inputs(sources, root)
    _check_out(root, settings)
    try:
        made = make_dirs(root)
    except OSError as e:
        raise DataError(
            f"--out '{root}' cannot be created ({e.strerror or type(e).__name__}); pass a writable directory"
        ) from None
    try:
        return _prepare(inputs, sources, root, settings, workers, k, n, shard_mb, progress, log)
    except BaseException:
        remove_made_dirs(made)  # only while empty: never what the lock holder (this or another process) wrote
        raise


def _prepare(
    inputs: list[dict],
    sources: list[str],
    root: Path,
    settings: Settings,
    workers: int,
    k: int,
    n: int,
    shard_mb: float,
    progress: bool,
    log,
) -> dict:
    t0 = time.perf_counter()
    with dir_lock(root, ".lock" if n == 1 else f".lock-part-{k}-of-{n}"):
        old = _old_shards(root, settings)
        fresh = n == 1 and not (root / "shards").exists()  # this process starts the directory
        (root / "shards").mkdir(exist_ok=True)
        try:
            groups = plan(inputs, old, settings, int(shard_mb * 2**20))
            mine = [g for i, g in enumerate(groups) if i % n == k - 1]
            todo = [g for g in mine if not _complete(root, g[0], log)]
            todo_bytes = sum(f["size"] for _, files in todo for f in files)
            if todo:
                log(
                    f"prepare: {len(todo)} of {len(mine)} shards to build ({todo_bytes / 1e6:,.1f} MB of input) "
                    f"with {min(workers, len(todo))} worker(s) -> {root}"
                )
            _run(todo, root, settings, workers, progress, log)
            order = [sid for sid, _ in groups]
            if n == 1:
                manifest = _finish(root, settings, order, sources)
            else:
                make_dirs(root / "parts")
                record = {"part": k, "of": n, "order": order, "inputs": sources}
                write_json(root / "parts" / f"part-{k}-of-{n}.json", record)
        except BaseException as e:
            if (
                fresh
                and not (root / "manifest.json").exists()
                and (isinstance(e, NoDataError) or not own_shard_ids(root))
            ):
                _take_back(root)  # a first run that finished nothing of use leaves nothing
            raise
    if n > 1:
        with dir_lock(root, wait=True):
            return _combine(root, settings, n, record, log) or record
    secs = time.perf_counter() - t0
    log(
        f"prepare: {manifest['train']['docs']:,} train / {manifest['val']['docs']:,} val documents, "
        f"{manifest['bytes'] / 1e6:,.1f} MB in {len(order)} shards"
        + (
            f"; built {todo_bytes / 1e6:,.1f} MB at {todo_bytes / 1e6 / max(secs, 1e-9):,.1f} MB/s"
            if todo
            else "; nothing new to build"
        )
        + f" -> {root}"
    )
    return manifest


def _finish(root: Path, settings: Settings, order: list[str], sources: list[str]) -> dict:
    """Write the manifest of the shards `order` and sweep the rest (the caller holds the lock)."""
    manifest = _manifest(root, settings, order, sources)
    stale = own_shard_ids(root) - set(order)  # read before the new manifest replaces the old one
    write_json(root / "manifest.json", manifest, indent=None)  # compact: it lists every input file
    _sweep(root, stale)
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
        raise DataError(
            f"the parts of '{root}' were planned from different inputs; run every --part with the "
            f"same sources (and the same settings)"
        )
    manifest = _finish(root, settings, record["order"], record["inputs"])
    for i in range(1, n + 1):
        (root / "parts" / f"part-{i}-of-{n}.json").unlink(missing_ok=True)
    log(
        f"prepare: all {n} parts done: {manifest['train']['docs']:,} train / {manifest['val']['docs']:,} val "
        f"documents, {manifest['bytes'] / 1e6:,.1f} MB in {len(record['order'])} shards -> {root}"
    )
    return manifest
