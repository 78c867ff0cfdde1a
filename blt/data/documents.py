"""Documents of one input: a plain-text, JSON lines, JSON or Parquet file (each optionally .gz or
.zst compressed), or a HF hub dataset by name. Documents come as (bytes back to back, lengths).

    raw = path.read_bytes()                             # read once: hashed and parsed
    for data, lengths in file_documents(path, raw, "text", "document"): ...
    files = resolve_files(["corpus/", "extra/*.jsonl.gz"], "data.train")

Plain text is read as bytes, so any byte sequence is trained on exactly as it is in the file (CRLF,
invalid UTF-8 included). JSON lines and Parquet are parsed by pyarrow straight from the read bytes;
a hub dataset goes through HF `datasets` (it needs a network).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from blt.errors import UserError

SNIFF_BYTES = 8192  # a NUL byte in this many leading bytes marks a text file as binary
HUB_PREFIX = "hub:"  # a source "hub:owner/name" is a HF hub dataset

Docs = tuple[np.ndarray, np.ndarray]  # (bytes of the documents back to back: uint8, their lengths: int64)


class DataError(UserError):
    """A data problem the user can fix; str(e) is one line naming the file and the fix."""


def resolve_files(patterns: list[str], what: str) -> list[Path]:
    """Paths, directories (all files inside, hidden ones skipped) and globs -> sorted absolute paths,
    each file once: symlinks are kept as named, and a file reached by several names (a `**` glob
    through a symlink loop, a link beside its target) is taken once, by its shortest name."""
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            found = sorted(os.path.abspath(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(expanded):
            found = []
            for dirpath, dirnames, names in os.walk(os.path.abspath(expanded)):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found += [os.path.join(dirpath, n) for n in names if not n.startswith(".")]
            found = [p for p in found if os.path.isfile(p)]
        else:
            found = [os.path.abspath(expanded)] if os.path.isfile(expanded) else []
        if not found:
            raise DataError(f"{what}: '{pattern}' matches no file (check the path; globs like 'data/*.txt' work)")
        files.extend(found)
    named: dict[str, str] = {}  # real path -> the shortest name reaching it
    for p in sorted(set(files), key=lambda p: (p.count(os.sep), p)):
        named.setdefault(os.path.realpath(p), p)
    return [Path(p) for p in sorted(named.values())]


def read_input(path: Path) -> bytes:
    """A file's bytes; a file that cannot be read is a DataError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}' ({e.strerror or type(e).__name__}); check the file") from None


def describe(files: list, verb: str = "") -> str:
    """Names files for a message: 'a.txt', or 'a.txt' and 3 more files; a `verb` ("hold") agrees with
    them: 'a.txt' holds, 'a.txt' and 3 more files hold."""
    text = f"'{files[0]}'" + (f" and {len(files) - 1} more files" if len(files) > 1 else "")
    return f"{text} {verb}{'s' if len(files) == 1 else ''}" if verb else text


def _decompress(path: Path, raw: bytes) -> tuple[str, bytes]:
    """(the format suffix, the bytes) of a file, .gz and .zst undone."""
    suffixes = [s.lower() for s in path.suffixes]
    last = suffixes[-1] if suffixes else ""
    if last not in (".gz", ".zst"):
        return last, raw
    try:
        if last == ".gz":
            raw = gzip.decompress(raw)
        else:
            import pyarrow as pa

            raw = pa.input_stream(pa.BufferReader(raw), compression="zstd").read()
    except Exception as e:  # any failure is the file's: say which
        raise DataError(f"'{path}' is not valid {last[1:]} ({type(e).__name__}); fix or remove the file") from None
    return (suffixes[-2] if len(suffixes) > 1 else ""), raw


def _text_docs(path: Path, raw: bytes, sample_by: str) -> Docs:
    """A plain-text file as documents: the whole file, its paragraphs ("\\n\\n") or its lines."""
    if b"\0" in raw[:SNIFF_BYTES]:
        raise DataError(
            f"'{path}' looks binary (NUL bytes in its first 8 KB); use text, .jsonl, .json or .parquet files"
        )
    if sample_by == "document":
        pieces = [raw]
    else:  # separators are dropped, as datasets' `text` builder does; EOS marks the end instead
        pieces = raw.split(b"\n\n" if sample_by == "paragraph" else b"\n")
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    data = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    return data, lengths[lengths > 0]


def column_docs(column, where: str) -> Iterator[Docs]:
    """A pyarrow string column -> Docs per chunk, straight from the Arrow buffers (nulls skipped)."""
    import pyarrow as pa

    if pa.types.is_null(column.type):
        return
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where} holds {column.type}, not text; set data.text_field to a text column")
    for chunk in column.chunks:
        chunk = chunk.drop_null().cast(pa.large_binary())
        if len(chunk) == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]] if data_buf else np.zeros(0, np.uint8)
        lengths = np.diff(offsets)
        yield data, lengths[lengths > 0]


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    lines = [s for s in str(cause).splitlines() if s.strip()]
    return f"{type(cause).__name__}: {lines[0][:200]}" if lines else type(cause).__name__


def _field(table, text_field: str, where: str):
    if text_field not in table.column_names:
        raise DataError(
            f"{where} has no field '{text_field}' (fields: {', '.join(table.column_names) or 'none'}); "
            f"set data.text_field to the field holding the text"
        )
    return table.column(text_field)


def _json_docs(path: Path, raw: bytes, text_field: str) -> Iterator[Docs]:
    """JSON lines (pyarrow), or one JSON array of objects."""
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        table = pj.read_json(pa.BufferReader(raw), read_options=pj.ReadOptions(block_size=1 << 24))
    except Exception as e:  # not JSON lines: perhaps one JSON array
        try:
            records = json.loads(raw)
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("not a list of objects")
            table = pa.Table.from_pylist([{text_field: r.get(text_field)} if text_field in r else r for r in records])
        except Exception:
            raise DataError(
                f"'{path}' is not valid JSON lines or a JSON array of objects ({_first_line(e)}); "
                f"fix or remove the file"
            ) from None
    if table.num_rows == 0:
        return
    yield from column_docs(_field(table, text_field, f"'{path}'"), f"field '{text_field}' of '{path}'")


def _parquet_docs(path: Path, raw: bytes, text_field: str) -> Iterator[Docs]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(pa.BufferReader(raw))
        if text_field not in schema.names:
            raise DataError(
                f"'{path}' has no field '{text_field}' (fields: {', '.join(schema.names) or 'none'}); "
                f"set data.text_field to the field holding the text"
            )
        table = pq.read_table(pa.BufferReader(raw), columns=[text_field])
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"'{path}' is not valid Parquet ({_first_line(e)}); fix or remove the file") from None
    yield from column_docs(table.column(text_field), f"field '{text_field}' of '{path}'")


def file_documents(path: Path, raw: bytes, text_field: str, sample_by: str) -> Iterator[Docs]:
    """The documents of one file, given its bytes as read from disk."""
    kind, raw = _decompress(path, raw)
    if kind in (".jsonl", ".json"):
        yield from _json_docs(path, raw, text_field)
    elif kind == ".parquet":
        yield from _parquet_docs(path, raw, text_field)
    else:
        yield _text_docs(path, raw, sample_by)


@contextlib.contextmanager
def _quiet_datasets():
    """Import datasets with its progress bars and logs off."""
    import datasets

    old = (datasets.utils.logging.get_verbosity(), datasets.utils.are_progress_bars_disabled())
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.utils.logging.set_verbosity(old[0])
        if not old[1]:
            datasets.enable_progress_bars()


def hub_documents(name: str, text_field: str, cache_dir: Path) -> Iterator[Docs]:
    """The train split of a HF hub dataset (downloaded by `datasets`; needs a network)."""
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(name, split="train", cache_dir=str(cache_dir))
        except Exception as e:
            raise DataError(
                f"could not load hub dataset '{name}' ({_first_line(e)}); check the name and the "
                f"network, or use local files"
            ) from None
    yield from column_docs(
        _field(ds.data, text_field, f"hub dataset '{name}'"), f"field '{text_field}' of hub dataset '{name}'"
    )
