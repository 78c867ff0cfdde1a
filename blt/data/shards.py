"""The prepared-data format: a directory of shards of packed byte ids, a document index and a
manifest; written atomically, checked when read.

    DIR/manifest.json             format, settings, input files (size, mtime, sha256), shards, totals
    DIR/shards/<id>.json          one shard's record; written last, so it marks the shard complete
    DIR/shards/<id>.<split>.bin   uint16 ids BOS doc EOS BOS doc EOS ... (split: train, val)
    DIR/shards/<id>.<split>.idx   int64 offset of every document's BOS in the .bin
    DIR/entropies/<key>/          float16 entropies of the train shards (blt/data/entropies.py)

    prepared = Prepared.open(DIR)          # refuses another format version, missing or truncated shards
    ids = prepared.read(shard, "train", a, b)  # ids [a, b), their 4 MB blocks' checksums verified once
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blt.data.documents import DataError

FORMAT = 2  # bump when the layout changes; a manifest of another format is refused
SPLITS = ("train", "val")
BLOCK = 1 << 22  # bytes per checksummed block of a shard: a reader verifies each block it touches, once


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent, separators=None if indent else (",", ":")))
    os.replace(tmp, path)


@dataclass
class Shard:
    """One shard: the input files it packs and, per split, its ids, documents and checksum."""
    id: str
    files: list[dict]  # [{"path", "size", "mtime_ns", "sha256"}]
    splits: dict[str, dict]  # split -> {"tokens", "docs", "sha256"}

    def to_json(self) -> dict:
        return {"id": self.id, "files": self.files, **self.splits}

    @classmethod
    def from_json(cls, d: dict) -> "Shard":
        return cls(d["id"], d["files"], {s: d[s] for s in SPLITS})

    @property
    def num_bytes(self) -> int:
        return sum(f["size"] for f in self.files)


def shard_path(root: Path, shard_id: str, split: str, ext: str = "bin") -> Path:
    return root / "shards" / f"{shard_id}.{split}.{ext}"


def read_record(root: Path, shard_id: str) -> Shard | None:
    """The record of a complete shard, None when it was never finished."""
    try:
        return Shard.from_json(json.loads((root / "shards" / f"{shard_id}.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None


class ShardWriter:
    """Writes one split of one shard to temporary files, renamed into place by `finish`."""

    def __init__(self, root: Path, shard_id: str, split: str):
        self.final = (shard_path(root, shard_id, split), shard_path(root, shard_id, split, "idx"))
        self.tmp = tuple(p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in self.final)
        self.bin, self.idx = open(self.tmp[0], "wb"), open(self.tmp[1], "wb")
        self.hash, self.tokens, self.docs = hashlib.sha256(), 0, 0
        self.blocks: list[str] = []  # sha256 of every BLOCK bytes of the .bin
        self.block, self.block_len = hashlib.sha256(), 0

    def write(self, packed: np.ndarray, lengths: np.ndarray) -> None:
        """Append packed documents (uint16 BOS doc EOS ...) whose byte lengths are `lengths`."""
        starts = self.tokens + np.cumsum(lengths + 2) - (lengths + 2)  # (docs,) each BOS's offset
        buf = packed.tobytes()
        self.bin.write(buf)
        self.idx.write(starts.astype(np.int64).tobytes())
        self.hash.update(buf)
        view = memoryview(buf)
        while view:
            part = view[: BLOCK - self.block_len]
            self.block.update(part)
            self.block_len += len(part)
            view = view[len(part):]
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
        return {"tokens": self.tokens, "docs": self.docs, "sha256": self.hash.hexdigest(), "blocks": self.blocks}

    def abort(self) -> None:
        for f, tmp in zip((self.bin, self.idx), self.tmp):
            f.close()
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def dir_lock(root: Path, name: str = ".lock", wait: bool = False):
    """Hold an exclusive lock on root/name while writing; a second writer is refused with one line
    (or, with wait=True, waits for the first)."""
    path = root / name
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DataError(f"'{root}' is being written by another `blt prepare` ({holder}); wait for it to finish, "
                        f"or prepare into another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield
    finally:
        f.close()


def check_format(manifest: dict, root: Path) -> None:
    if manifest.get("format") != FORMAT:
        raise DataError(f"'{root}' was prepared in data format {manifest.get('format')}, but this blt reads format "
                        f"{FORMAT}; prepare the sources again with `blt prepare SOURCES --out NEW_DIR`")


@dataclass
class Prepared:
    """A prepared directory, opened for reading."""
    root: Path
    manifest: dict
    shards: list[Shard]
    _maps: dict = field(default_factory=dict)  # (shard, split) -> ids
    _verified: dict = field(default_factory=dict)  # (shard, split) -> blocks whose checksum matched

    @classmethod
    def open(cls, root: str | Path, what: str = "data") -> "Prepared":
        root = Path(root)
        path = root / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{what}: '{root}' holds no manifest.json (not a prepared directory, or its "
                            f"`blt prepare` has not finished); run `blt prepare SOURCES --out {root}`") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{what}: '{path}' cannot be read ({type(e).__name__}); prepare the data again") from None
        check_format(manifest, root)
        shards = [Shard.from_json(s) for s in manifest["shards"]]
        for s in shards:  # a missing or truncated shard is found at once (stat only; checksums on first read)
            for split in SPLITS:
                p = shard_path(root, s.id, split)
                size = p.stat().st_size if p.is_file() else -1
                if size != 2 * s.splits[split]["tokens"]:
                    state = "is missing" if size < 0 else f"has {size:,} bytes, not {2 * s.splits[split]['tokens']:,}"
                    raise DataError(f"{what}: shard '{p}' {state} (truncated or deleted); rerun `blt prepare` "
                                    f"for '{root}' to rebuild it")
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
                    if hashlib.sha256(raw[block * BLOCK: (block + 1) * BLOCK]).hexdigest() != expected[block]:
                        p = shard_path(self.root, self.shards[k].id, split)
                        raise DataError(f"shard '{p}' does not match its checksum (corrupted at bytes "
                                        f"{block * BLOCK:,}-{min(len(raw), (block + 1) * BLOCK):,}); delete "
                                        f"'{p.with_suffix('').with_suffix('.json')}' and rerun `blt prepare` for "
                                        f"'{self.root}' to rebuild it")
                    done.add(block)
        return ids[a:b]

    def tokens(self, k: int, split: str) -> np.ndarray:
        """Shard k's whole split, every block verified."""
        return self.read(k, split, 0, self.shards[k].splits[split]["tokens"])

    def split_tokens(self, split: str, limit: int | None = None) -> "Concat":
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
