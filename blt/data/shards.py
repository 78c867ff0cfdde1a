"""The prepared-data format: a directory of shards of packed byte ids, a document index and a
manifest; written atomically, checked when read.

    DIR/manifest.json             format, settings, input files (size, mtime, sha256), shards, totals
    DIR/.lock                     held by the `blt prepare` writing DIR (.lock-part-K-of-N: by part K)
    DIR/shards/<id>.json          one shard's record; written last, so it marks the shard complete
    DIR/shards/<id>.<split>.bin   uint16 ids BOS doc EOS BOS doc EOS ... (split: train, val)
    DIR/shards/<id>.<split>.idx   int64 offset of every document's BOS in the .bin
    DIR/entropies/<key>/          float16 entropies of the train shards (blt/data/entropies.py)

    prepared = Prepared.open(DIR)          # refuses another format, a damaged manifest, missing or truncated shards
    ids = prepared.read(shard, "train", a, b)  # ids [a, b), their 4 MB blocks' checksums verified once

A shard's bytes are checked by the sha256 of each 4 MB block (`blocks`), which a reader verifies
for the blocks it touches; there is no whole-file hash, which nothing could check without reading
the whole shard. `blt prepare` names its files exactly (SHARD_FILE, TEMP_FILE) and never touches
another file in DIR.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blt.data.documents import DataError
from blt.disk import LockHeld, file_lock

FORMAT = 2  # bump when the layout changes; a manifest of another format is refused
SPLITS = ("train", "val")
BLOCK = 1 << 22  # bytes per checksummed block of a shard: a reader verifies each block it touches, once
SHARD_FILE = re.compile(r"(?P<id>[0-9a-f]{20})\.(json|(train|val)\.(bin|idx))")  # the files of a shard, by name
TEMP_FILE = re.compile(r"\.([0-9a-f]{20}\.(json|(train|val)\.(bin|idx))|manifest\.json)\.tmp-\d+")  # being written
LOCK_FILE = re.compile(r"\.lock(-part-\d+-of-\d+)?")


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, separators=None if indent else (",", ":")))
    os.replace(tmp, path)


@dataclass
class Shard:
    """One shard: the input files it packs and, per split, its ids, documents and checksum."""

    id: str
    files: list[dict]  # [{"path", "size", "mtime_ns", "sha256"}] of the input files
    splits: dict[str, dict]  # split -> {"tokens", "docs", "blocks": sha256 of each BLOCK bytes of the .bin}

    def to_json(self) -> dict:
        return {"id": self.id, "files": self.files, **self.splits}

    @classmethod
    def from_json(cls, d: dict) -> Shard:
        return cls(d["id"], d["files"], {s: {k: d[s][k] for k in ("tokens", "docs", "blocks")} for s in SPLITS})

    @property
    def num_bytes(self) -> int:
        return sum(f["size"] for f in self.files)


def shard_path(root: Path, shard_id: str, split: str, ext: str = "bin") -> Path:
    return root / "shards" / f"{shard_id}.{split}.{ext}"


def _kind(value) -> str:
    """A JSON value with its type, for a message: '2' (a string), [] (a list), 3."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    names = {str: "a string", list: "a list", dict: "an object", float: "a number", bool: "a boolean"}
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({names.get(type(value), 'null')})"


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_problem(d) -> str | None:
    """What is wrong with one shard's entry (a record, or an item of a manifest's shards); None: nothing."""
    if not isinstance(d, dict):
        return f"is {_kind(d)}, not an object"
    if not isinstance(d.get("id"), str) or not re.fullmatch(r"[0-9a-f]{20}", d["id"]):
        return f"'id' is {_kind(d.get('id'))}, not a shard id"
    files = d.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict)
        and isinstance(f.get("path"), str)
        and _count(f.get("size"))
        and type(f.get("mtime_ns")) is int
        for f in files
    ):
        return "'files' is not a list of input files (path, size, mtime_ns)"
    for split in SPLITS:
        entry = d.get(split)
        if not isinstance(entry, dict):
            return f"'{split}' is {_kind(entry)}, not an object"
        for key in ("tokens", "docs"):
            if not _count(entry.get(key)):
                return f"{split} '{key}' is {_kind(entry.get(key))}, not a count"
        blocks, need = entry.get("blocks"), -(-2 * entry["tokens"] // BLOCK)
        if not isinstance(blocks, list) or len(blocks) != need or not all(isinstance(b, str) for b in blocks):
            return (
                f"{split} 'blocks' is {_kind(blocks)}, not {need} checksum(s), one per 4 MB block of its "
                f"{2 * entry['tokens']:,} bytes"
            )
    return None


def read_record(root: Path, shard_id: str) -> Shard | None:
    """The record of a complete shard, None when it was never finished (or is damaged)."""
    try:
        d = json.loads((root / "shards" / f"{shard_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return Shard.from_json(d) if _shard_problem(d) is None and d["id"] == shard_id else None


def shard_damage(root: Path, shard: Shard) -> str | None:
    """How a shard's files differ from its record ("'path' is missing", "... has N bytes, not M"), by
    their sizes only; None when they match."""
    for split in SPLITS:
        for ext, want in (("bin", 2 * shard.splits[split]["tokens"]), ("idx", 8 * shard.splits[split]["docs"])):
            p = shard_path(root, shard.id, split, ext)
            size = p.stat().st_size if p.is_file() else -1
            if size != want:
                return f"shard '{p}' " + ("is missing" if size < 0 else f"has {size:,} bytes, not {want:,}")
    return None


def own_shard_ids(root: Path) -> set[str]:
    """The ids of the shards `blt prepare` wrote into root: those with a record, and those of the manifest."""
    ids = {
        m["id"]
        for p in (root / "shards").iterdir()
        if (m := SHARD_FILE.fullmatch(p.name)) and p.suffix == ".json" and read_record(root, m["id"])
    }
    try:
        ids.update(s.id for s in read_manifest(root)[1])
    except DataError:
        pass
    return ids


def prepared_state(d: Path) -> str | None:
    """'done' for a directory a `blt prepare` finished, 'unfinished' for one a `blt prepare` is
    writing or was stopped in, None for any other directory."""
    if not (d / "shards").is_dir():
        return None
    if (d / "manifest.json").is_file():
        return "done"
    return "unfinished" if any(LOCK_FILE.fullmatch(p.name) for p in d.iterdir()) else None


class ShardWriter:
    """Writes one split of one shard to temporary files, renamed into place by `finish`."""

    def __init__(self, root: Path, shard_id: str, split: str):
        self.final = (shard_path(root, shard_id, split), shard_path(root, shard_id, split, "idx"))
        self.tmp = tuple(p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in self.final)
        self.bin, self.idx = open(self.tmp[0], "wb"), open(self.tmp[1], "wb")
        self.tokens, self.docs = 0, 0
        self.blocks: list[str] = []  # sha256 of every BLOCK bytes of the .bin
        self.block, self.block_len = hashlib.sha256(), 0

    def write(self, packed: np.ndarray, lengths: np.ndarray) -> None:
        """Append packed documents (uint16 BOS doc EOS ...) whose byte lengths are `lengths`."""
        starts = self.tokens + np.cumsum(lengths + 2) - (lengths + 2)  # (docs,) each BOS's offset
        buf = packed.tobytes()
        self.bin.write(buf)
        self.idx.write(starts.astype(np.int64).tobytes())
        view = memoryview(buf)
        while view:
            part = view[: BLOCK - self.block_len]
            self.block.update(part)
            self.block_len += len(part)
            view = view[len(part) :]
            if self.block_len == BLOCK:
                self.blocks.append(self.block.hexdigest())
                self.block, self.block_len = hashlib.sha256(), 0
        self.tokens += len(packed)
        self.docs += len(lengths)

    def finish(self) -> dict:
        for f in (self.bin, self.idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, final in zip(self.tmp, self.final):
            os.replace(tmp, final)
        if self.block_len:
            self.blocks.append(self.block.hexdigest())
        return {"tokens": self.tokens, "docs": self.docs, "blocks": self.blocks}

    def abort(self) -> None:
        for f, tmp in zip((self.bin, self.idx), self.tmp):
            f.close()
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def dir_lock(root: Path, name: str = ".lock", wait: bool = False):
    """Hold an exclusive lock on root/name while writing (blt.disk.file_lock); a second writer is
    refused with one line (or, with wait=True, waits for the first). The holder may remove the lock
    file (a failed first run takes its directory back); a waiting process then locks the new one."""
    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock(root / name, wait=wait))
    except LockHeld as e:
        raise DataError(
            f"'{root}' is being written by another `blt prepare` ({e.holder}); wait for it to "
            f"finish, or prepare into another --out"
        ) from None
    except FileNotFoundError:
        raise DataError(
            f"'{root}' was removed by the `blt prepare` that held it (it failed); rerun the command"
        ) from None
    except OSError as e:
        raise DataError(
            f"--out '{root}' is not writable ({e.strerror or type(e).__name__}); pass a writable directory"
        ) from None
    with held:
        yield


def read_manifest(root: Path, what: str = "") -> tuple[dict, list[Shard]]:
    """A prepared directory's manifest and shards, its format and layout checked; a missing or damaged
    manifest, or one of another format, is a DataError naming the file (prefixed by `what`)."""
    path, who = root / "manifest.json", f"{what}: " if what else ""
    fix = "prepare the sources again with `blt prepare SOURCES --out NEW_DIR`"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{who}'{root}' holds no manifest.json (not a prepared directory, or its `blt prepare` has "
            f"not finished); run `blt prepare SOURCES --out {root}`"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{who}'{path}' cannot be read ({type(e).__name__}); {fix}") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise DataError(f"{who}'{path}' is not a manifest of `blt prepare` ({_kind(manifest)}); {fix}")
    if type(manifest["format"]) is not int or manifest["format"] != FORMAT:
        raise DataError(
            f"{who}'{root}' was prepared in data format {_kind(manifest['format'])}, but this blt reads "
            f"format {FORMAT}; {fix}"
        )
    problem = (
        "'settings' is not an object"
        if not isinstance(manifest.get("settings"), dict)
        else "'shards' is not a list"
        if not isinstance(manifest.get("shards"), list)
        else next((f"shards[{i}] {p}" for i, s in enumerate(manifest["shards"]) if (p := _shard_problem(s))), None)
    )
    if problem:
        raise DataError(f"{who}'{path}' is damaged ({problem}); {fix}")
    return manifest, [Shard.from_json(s) for s in manifest["shards"]]


@dataclass
class Prepared:
    """A prepared directory, opened for reading."""

    root: Path
    manifest: dict
    shards: list[Shard]
    _maps: dict = field(default_factory=dict)  # (shard, split) -> ids
    _verified: dict = field(default_factory=dict)  # (shard, split) -> blocks whose checksum matched

    @classmethod
    def open(cls, root: str | Path, what: str = "data") -> Prepared:
        root = Path(root)
        manifest, shards = read_manifest(root, what)
        for s in shards:  # a missing or truncated shard is found at once (stat only; checksums on first read)
            if damage := shard_damage(root, s):
                raise DataError(
                    f"{what}: {damage} (truncated or deleted); rerun `blt prepare SOURCES --out {root}` to rebuild it"
                )
        return cls(root, manifest, shards)

    def totals(self, split: str) -> tuple[int, int]:
        """(ids, documents) of a split over all shards."""
        return (sum(s.splits[split]["tokens"] for s in self.shards), sum(s.splits[split]["docs"] for s in self.shards))

    def _ids(self, k: int, split: str) -> np.ndarray:
        """Shard k's ids of a split, memory-mapped read-only (a plain ndarray view: fast slices)."""
        key = (k, split)
        if key not in self._maps:
            s = self.shards[k]
            if s.splits[split]["tokens"] == 0:
                self._maps[key] = np.zeros(0, np.uint16)
            else:
                self._maps[key] = np.asarray(np.memmap(shard_path(self.root, s.id, split), dtype=np.uint16, mode="r"))
            self._verified[key] = set()
        return self._maps[key]

    def read(self, k: int, split: str, a: int, b: int) -> np.ndarray:
        """Ids [a, b) of shard k's split. Every 4 MB block they touch is checked against its
        checksum the first time this process reads it, so a corrupted shard is named at once
        while start-up never reads a whole corpus."""
        ids = self._ids(k, split)
        b = min(b, len(ids))
        if b > a:
            done, expected = self._verified[(k, split)], self.shards[k].splits[split]["blocks"]
            raw = ids.view(np.uint8)
            for block in range(2 * a // BLOCK, (2 * b - 1) // BLOCK + 1):
                if block not in done:
                    if hashlib.sha256(raw[block * BLOCK : (block + 1) * BLOCK]).hexdigest() != expected[block]:
                        p = shard_path(self.root, self.shards[k].id, split)
                        raise DataError(
                            f"shard '{p}' does not match its checksum (corrupted at bytes "
                            f"{block * BLOCK:,}-{min(len(raw), (block + 1) * BLOCK):,}); delete "
                            f"'{p.with_suffix('').with_suffix('.json')}' and rerun `blt prepare` for "
                            f"'{self.root}' to rebuild it"
                        )
                    done.add(block)
        return ids[a:b]

    def tokens(self, k: int, split: str) -> np.ndarray:
        """Shard k's whole split, every block verified."""
        return self.read(k, split, 0, self.shards[k].splits[split]["tokens"])

    def split_tokens(self, split: str, limit: int | None = None) -> Concat:
        """A split's ids of every shard back to back (the first `limit` of them), read lazily."""
        return Concat(self, split, limit)


class Concat:
    """The ids of one split of every shard, back to back, as one sequence that opens (and checks)
    a shard only when a slice reaches it: `len(c)`, `c[a:b]` -> np.ndarray, `c[a:]` -> a lazy view."""

    def __init__(self, data: Prepared, split: str, limit: int | None = None, start: int = 0):
        self.data, self.split, self.start = data, split, start
        sizes = [s.splits[split]["tokens"] for s in data.shards]
        self.first = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (shards + 1,)
        total = int(self.first[-1])
        self.stop = total if limit is None else min(total, start + limit)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, sl: slice):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("Concat supports contiguous slices only")
        a, b, _ = sl.indices(len(self))
        if sl.stop is None:
            return Concat(self.data, self.split, b - a, self.start + a)
        a, b = self.start + a, self.start + max(a, b)
        parts = []
        for k in range(int(np.searchsorted(self.first, a, side="right")) - 1, len(self.data.shards)):
            if self.first[k] >= b:
                break
            lo, hi = max(a, self.first[k]) - self.first[k], min(b, self.first[k + 1]) - self.first[k]
            if hi > lo:
                parts.append(self.data.read(k, self.split, int(lo), int(hi)))
        return np.concatenate(parts) if parts else np.zeros(0, np.uint16)
