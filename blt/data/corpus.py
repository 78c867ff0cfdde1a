"""Text files -> packed token memmaps (train.bin, val.bin), built once and cached by content key.

    data = prepare_data(cfg.data)      # <cache_dir>/data/<key>/{train.bin, val.bin, meta.json}
    train = read_tokens(data.train)    # np.memmap uint16: BOS doc EOS BOS doc EOS ...

Plain text (.txt, .md, anything else) is read as bytes, so any byte sequence is trained on exactly
as it is in the file (CRLF, invalid UTF-8 included). JSON lines/JSON/Parquet and hub datasets go
through HF `datasets` (offline unless `data.hub_dataset` is set), column `data.text_field`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from blt.config import DataConfig
from blt.tokens import encode_documents
from blt.errors import UserError
from blt.disk import make_dirs, remove_made_dirs

FORMAT = 1  # bump when the packed layout changes, so old caches are not reused
BUNDLED_DIR = Path(__file__).resolve().parent / "shakespeare"
ARROW_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SNIFF_BYTES = 8192  # a NUL byte in this many leading bytes marks a text file as binary

Docs = tuple[np.ndarray, np.ndarray]  # (bytes of the documents back to back: uint8, their lengths: int64)


class DataError(UserError):
    """A data problem the user can fix; str(e) is one line naming the file and the fix."""


@dataclass
class PackedSplit:
    path: Path  # the .bin file: uint16 token ids, documents back to back
    num_tokens: int  # ids in the file (bytes + 2 per document)
    num_docs: int  # documents (each BOS ... EOS)


@dataclass
class PackedData:
    train: PackedSplit
    val: PackedSplit
    key: str  # hash of the inputs; names the cache directory
    dir: Path  # the cache directory holding train.bin, val.bin, meta.json


def read_tokens(split: PackedSplit) -> np.memmap:
    """The split's token stream, memory-mapped read-only."""
    return np.memmap(split.path, dtype=np.uint16, mode="r")


# ----------------------------------------------------------------------------- finding files


def resolve_files(patterns: list[str], what: str) -> list[Path]:
    """Paths, directories (all files inside) and globs -> sorted, de-duplicated files."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(expanded):
            found = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            found = [Path(expanded)] if os.path.isfile(expanded) else []
        if not found:
            raise DataError(f"{what}: '{pattern}' matches no file (check the path; globs like 'data/*.txt' work)")
        files.extend(found)
    return list(dict.fromkeys(p.resolve() for p in files))


def _describe(files: list[Path]) -> str:
    return f"'{files[0]}'" + (f" and {len(files) - 1} more files" if len(files) > 1 else "")


# ----------------------------------------------------------------------------- reading documents


def _text_docs(path: Path, sample_by: str) -> Docs:
    """A plain-text file as documents: the whole file, its paragraphs ("\\n\\n") or its lines."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}' ({e.strerror or type(e).__name__}); check the file") from None
    if b"\0" in raw[:SNIFF_BYTES]:
        raise DataError(f"'{path}' looks binary (NUL bytes in its first 8 KB); "
                        f"use text, .jsonl, .json or .parquet files")
    if sample_by == "document":
        pieces = [raw]
    else:  # separators are dropped, as datasets' `text` builder does; EOS marks the end instead
        pieces = raw.split(b"\n\n" if sample_by == "paragraph" else b"\n")
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    return data, lengths[lengths > 0]


def _column_docs(column, where: str) -> Iterator[Docs]:
    """A pyarrow string column -> Docs per chunk, straight from the Arrow buffers (nulls skipped)."""
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where} holds {column.type}, not text; set data.text_field to a text column")
    for chunk in column.chunks:
        chunk = chunk.drop_null().cast(pa.large_binary())
        if len(chunk) == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[chunk.offset: chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]] if data_buf else np.zeros(0, np.uint8)
        lengths = np.diff(offsets)
        yield data, lengths[lengths > 0]


@contextlib.contextmanager
def _quiet_datasets(offline: bool):
    """Import datasets with progress bars and logs off, and offline unless a hub dataset is wanted."""
    old_env = os.environ.get("HF_DATASETS_OFFLINE")
    if offline:
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # read by datasets at import
    import datasets

    old = (datasets.config.HF_HUB_OFFLINE, datasets.utils.logging.get_verbosity(),
           datasets.utils.are_progress_bars_disabled())
    if offline:
        datasets.config.HF_HUB_OFFLINE = True  # in case datasets was imported before
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE = old[0]
        datasets.utils.logging.set_verbosity(old[1])
        if not old[2]:
            datasets.enable_progress_bars()
        if offline:
            if old_env is None:
                os.environ.pop("HF_DATASETS_OFFLINE", None)
            else:
                os.environ["HF_DATASETS_OFFLINE"] = old_env


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    lines = [s for s in str(cause).splitlines() if s.strip()]
    return f"{type(cause).__name__}: {lines[0][:200]}" if lines else type(cause).__name__


def _arrow_file_docs(path: Path, text_field: str, hf_cache: Path) -> Iterator[Docs]:
    builder = ARROW_BUILDERS[path.suffix.lower()]
    with _quiet_datasets(offline=True) as datasets:
        try:
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=str(hf_cache))
        except Exception as e:  # any parse failure is the file's fault: say which file
            kind = "Parquet" if builder == "parquet" else "JSON/JSON lines"
            raise DataError(f"'{path}' is not valid {kind} ({_first_line(e)}); fix or remove the file") from None
    if text_field not in ds.column_names:
        raise DataError(f"'{path}' has no field '{text_field}' (fields: {', '.join(ds.column_names) or 'none'}); "
                        f"set data.text_field to the field holding the text")
    yield from _column_docs(ds.data.column(text_field), f"field '{text_field}' of '{path}'")


def _hub_docs(name: str, text_field: str, hf_cache: Path) -> Iterator[Docs]:
    with _quiet_datasets(offline=False) as datasets:
        try:
            ds = datasets.load_dataset(name, split="train", cache_dir=str(hf_cache))
        except Exception as e:
            raise DataError(f"could not load hub dataset '{name}' ({_first_line(e)}); check the name and the "
                            f"network, or use local files in data.train") from None
    if text_field not in ds.column_names:
        raise DataError(f"hub dataset '{name}' has no field '{text_field}' (fields: {', '.join(ds.column_names)}); "
                        f"set data.text_field")
    yield from _column_docs(ds.data.column(text_field), f"field '{text_field}' of hub dataset '{name}'")


def _file_docs(path: Path, text_field: str, sample_by: str, hf_cache: Path) -> Iterator[Docs]:
    if path.suffix.lower() in ARROW_BUILDERS:
        yield from _arrow_file_docs(path, text_field, hf_cache)
    else:
        yield _text_docs(path, sample_by)


Source = Callable[[], Iterator[Docs]]  # re-iterable: each call reads the documents again


def _sources(files: list[Path], cfg: DataConfig, hf_cache: Path) -> list[Source]:
    return [lambda p=p: _file_docs(p, cfg.text_field, cfg.sample_by, hf_cache) for p in files]


def encode_files(patterns: list[str], text_field: str = "text", sample_by: str = "document") -> np.ndarray:
    """Files/globs -> one in-memory packed uint16 token stream (no cache); for `blt eval --data`."""
    files = resolve_files(list(patterns), "--data")
    cfg = DataConfig(text_field=text_field, sample_by=sample_by)  # type: ignore[arg-type]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="blt-hf-") as tmp:
        parts = [encode_documents(d, n) for src in _sources(files, cfg, Path(tmp)) for d, n in src()]
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    if len(tokens) == 0:
        raise DataError(f"--data: {_describe(files)} hold no text; pass files with text")
    return tokens


# ----------------------------------------------------------------------------- packing and caching


def _write(sources: list[Source], outs: list[Path], assign: np.ndarray | None = None) -> list[PackedSplit]:
    """Pack every document into outs[0], or the i-th document overall into outs[assign[i]]; one read."""
    files = [open(p, "wb") for p in outs]
    tokens, docs, seen = [0] * len(outs), [0] * len(outs), 0
    try:
        for source in sources:
            for data, lengths in source():
                parts = [(0, data, lengths)]
                if assign is not None:
                    which = assign[seen: seen + len(lengths)]  # (docs in this chunk,)
                    seen += len(lengths)
                    per_byte = np.repeat(which, lengths)  # (bytes in this chunk,)
                    parts = [(k, data[per_byte == k], lengths[which == k]) for k in range(len(outs))]
                for k, d, n in parts:
                    packed = encode_documents(d, n)
                    packed.tofile(files[k])
                    tokens[k] += len(packed)
                    docs[k] += len(n)
    finally:
        for f in files:
            f.close()
    return [PackedSplit(p, t, n) for p, t, n in zip(outs, tokens, docs)]


def _split_mask(num_docs: int, cfg: DataConfig, where: str) -> np.ndarray:
    """True for the documents held out for validation: a seeded random val_fraction, at least one."""
    if num_docs < 2:
        raise DataError(f"{where} holds {num_docs} document(s): too few to hold out validation; set data.val to "
                        f"held-out files, or data.sample_by=paragraph to split it into more documents")
    num_val = min(num_docs - 1, max(1, round(num_docs * cfg.val_fraction)))
    is_val = np.zeros(num_docs, dtype=bool)
    is_val[np.random.default_rng(cfg.seed).permutation(num_docs)[:num_val]] = True
    return is_val


def _cache_key(cfg: DataConfig, train: list[Path], val: list[Path]) -> str:
    def stat(p: Path) -> list:
        s = p.stat()
        return [str(p), s.st_size, s.st_mtime_ns]

    spec = {"format": FORMAT, "train": [stat(p) for p in train], "val": [stat(p) for p in val],
            "hub": cfg.hub_dataset, "text_field": cfg.text_field, "sample_by": cfg.sample_by,
            "val_fraction": cfg.val_fraction if not val else None, "seed": cfg.seed if not val else None}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _from_meta(out: Path) -> PackedData:
    meta = json.loads((out / "meta.json").read_text())
    splits = {s: PackedSplit(out / f"{s}.bin", meta[s]["tokens"], meta[s]["docs"]) for s in ("train", "val")}
    return PackedData(splits["train"], splits["val"], meta["key"], out)


def _build(cfg: DataConfig, train: list[Path], val: list[Path], key: str, tmp: Path) -> dict:
    hf_cache = tmp / "hf_cache"
    train_src = [lambda: _hub_docs(cfg.hub_dataset, cfg.text_field, hf_cache)] if cfg.hub_dataset else \
        _sources(train, cfg, hf_cache)
    train_name = f"hub dataset '{cfg.hub_dataset}'" if cfg.hub_dataset else f"data.train ({_describe(train)})"
    packed: dict[str, PackedSplit] = {}
    if val:
        (packed["train"],) = _write(train_src, [tmp / "train.bin"])
        (packed["val"],) = _write(_sources(val, cfg, hf_cache), [tmp / "val.bin"])
    else:  # one pass to count documents, one to write them
        num_docs = sum(len(lengths) for src in train_src for _, lengths in src())
        if num_docs == 0:
            raise DataError(f"{train_name} holds no text (empty files?); point data.train at files with text")
        is_val = _split_mask(num_docs, cfg, train_name)
        packed["train"], packed["val"] = _write(train_src, [tmp / "train.bin", tmp / "val.bin"], is_val.astype(np.int8))
    if packed["train"].num_docs == 0:
        raise DataError(f"{train_name} holds no text (empty files?); point data.train at files with text")
    if packed["val"].num_docs == 0:
        raise DataError(f"data.val ({_describe(val)}) holds no text (empty files?); point data.val at files with text")
    shutil.rmtree(hf_cache, ignore_errors=True)
    return {"format": FORMAT, "key": key, "hub_dataset": cfg.hub_dataset, "text_field": cfg.text_field,
            "sample_by": cfg.sample_by, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "train": {"files": [str(p) for p in train], "docs": packed["train"].num_docs,
                      "tokens": packed["train"].num_tokens},
            "val": {"files": [str(p) for p in val] or "held out from train", "docs": packed["val"].num_docs,
                    "tokens": packed["val"].num_tokens}}


def prepare_data(cfg: DataConfig, log: Callable[[str], None] = print) -> PackedData:
    """Resolve, read, split and pack the configured data; reuse the cache when the inputs are unchanged."""
    if cfg.hub_dataset:
        train: list[Path] = []  # the hub dataset replaces data.train
    elif cfg.train:
        train = resolve_files(cfg.train, "data.train")
    else:
        train = sorted((BUNDLED_DIR / "train").glob("*.txt"))
    if cfg.val:
        val = resolve_files(cfg.val, "data.val")
    else:
        val = sorted((BUNDLED_DIR / "val").glob("*.txt")) if not (cfg.train or cfg.hub_dataset) else []
    key = _cache_key(cfg, train, val)
    cache = Path(os.path.expanduser(cfg.cache_dir or "~/.cache/blt"))
    root = cache / "data"
    out = root / key
    if (out / "meta.json").is_file():
        data = _from_meta(out)
        log(f"data: reusing {out} ({data.train.num_tokens:,} train / {data.val.num_tokens:,} val tokens)")
        return data

    made: list[Path] = []
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # renamed into place when complete
    try:
        made = make_dirs(root)
        tmp.mkdir()
        meta = _build(cfg, train, val, key, tmp)  # inputs it cannot read are DataErrors: an OSError is the cache's
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same key first: use theirs
            if not (out / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made_dirs(made)
        if isinstance(e, OSError):
            raise DataError(f"data.cache_dir '{cache}' is not writable ({e.strerror or type(e).__name__}); set "
                            "data.cache_dir=PATH to a writable directory") from None
        raise
    data = _from_meta(out)
    log(f"data: packed {data.train.num_docs:,} train documents ({data.train.num_tokens:,} tokens) and "
        f"{data.val.num_docs:,} val ({data.val.num_tokens:,} tokens) into {out}")
    return data
