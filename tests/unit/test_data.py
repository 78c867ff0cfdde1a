"""The data pipeline through the data config: exact bytes in the shards, held-out splits, the
cache, one-line errors; evaluation windows. Prepare itself and the training stream: test_prepare.py."""

import json
import os

import numpy as np
import pytest
import torch

from blt.config import DataConfig
from blt.data import (
    BOS_ID,
    BUNDLED_DIR,
    EOS_ID,
    OFFSET,
    PAD_ID,
    DataError,
    decode,
    encode,
    encode_files,
    eval_windows,
    prepare_data,
)


def quiet(_msg):
    pass


def packed_docs(tokens) -> list[bytes]:
    """Split a packed stream back into its documents' bytes."""
    arr = np.asarray(tokens)
    starts, ends = np.flatnonzero(arr == BOS_ID), np.flatnonzero(arr == EOS_ID)
    assert len(starts) == len(ends)
    return [decode(arr[s + 1 : e]) for s, e in zip(starts, ends)]


def train_docs(corpus) -> list[bytes]:
    data = corpus.sources[0].data
    return [d for k in range(len(data.shards)) for d in packed_docs(data.tokens(k, "train"))]


def val_docs(corpus) -> list[bytes]:
    return packed_docs(np.concatenate([t[0 : len(t)] for _, t in corpus.val_tokens()]))


# ----------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("data", ["héllo 世界 🙂", b"\xff\xfe\x80abc", "", b"\x00\x01\x02\x03"])
def test_encode_decode_round_trip(data):
    raw = data.encode("utf-8") if isinstance(data, str) else data
    ids = encode(data)
    assert ids.dtype == np.uint16 and ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == len(raw) + 2
    assert decode(ids) == raw
    assert decode(torch.from_numpy(ids.astype(np.int64))) == raw
    assert decode(ids.tolist()) == raw
    assert len(encode(data, bos=False, eos=False)) == len(raw)
    assert (encode(data, bos=False, eos=False) >= OFFSET).all()


# ----------------------------------------------------------------------------- prepare_data


def test_text_jsonl_parquet_token_counts(tmp_path):
    docs_txt = [b"first play\nline two\n", "h\xe9llo 世界\n".encode()]
    for i, d in enumerate(docs_txt):
        (tmp_path / f"doc{i}.txt").write_bytes(d)
    rows = [{"text": "alpha", "id": 1}, {"text": "βeta 🙂", "id": 2}, {"text": "", "id": 3}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["gamma", "delta delta"]}), tmp_path / "rows.parquet")
    (tmp_path / "more.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    with pa.output_stream(str(tmp_path / "most.jsonl.zst"), compression="zstd") as f:
        f.write(b'{"text": "zstd"}\n')
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "in an array"}]))
    val_text = "held out text"
    (tmp_path / "val.txt").write_text(val_text)

    cfg = DataConfig(
        train=[str(tmp_path / "doc*.txt"), str(tmp_path / "*.json*"), str(tmp_path / "rows.parquet")],
        val=[str(tmp_path / "val.txt")],
        cache_dir=str(tmp_path / "cache"),
    )
    data = prepare_data(cfg, log=quiet)
    # files in sorted path order, rows in file order; the empty row is dropped
    expected = (
        [b"in an array"] + docs_txt + [b"zipped", b"zstd", b"alpha", "βeta 🙂".encode(), b"gamma", b"delta delta"]
    )
    assert data.sources[0].data.totals("train") == (sum(len(d) + 2 for d in expected), len(expected))
    assert train_docs(data) == expected
    assert val_docs(data) == [val_text.encode()]
    shard = data.sources[0].data.shards[0]
    assert [f["path"] for f in shard.files] == sorted(f["path"] for f in shard.files)
    assert not list((tmp_path / "cache" / "data").rglob(".*tmp*"))  # no temporary file left behind


def test_invalid_utf8_and_crlf_survive_exactly(tmp_path):
    raw = b"line one\r\nbad \xff\xfe\x80 bytes\r\n\xc3(\n"
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "b.txt").write_bytes(b"other")
    cfg = DataConfig(train=[str(tmp_path / "a.txt")], val=[str(tmp_path / "b.txt")], cache_dir=str(tmp_path))
    data = prepare_data(cfg, log=quiet)
    assert train_docs(data) == [raw]
    assert np.array_equal(encode_files([str(tmp_path / "a.txt")]), encode(raw))


def test_sample_by_paragraph_and_line(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"p1 a\np1 b\n\np2\n\n\n\np3\n")
    (tmp_path / "v.txt").write_bytes(b"v")
    base = dict(train=[str(tmp_path / "t.txt")], val=[str(tmp_path / "v.txt")], cache_dir=str(tmp_path))
    para = prepare_data(DataConfig(**base, sample_by="paragraph"), log=quiet)
    assert train_docs(para) == [b"p1 a\np1 b", b"p2", b"p3\n"]
    line = prepare_data(DataConfig(**base, sample_by="line"), log=quiet)
    assert train_docs(line) == [b"p1 a", b"p1 b", b"p2", b"p3"]


def test_val_split_is_by_document_and_deterministic(tmp_path):
    docs = [f"document number {i} " * (i + 1) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))

    def split(seed, cache):
        cfg = DataConfig(
            train=[str(tmp_path / "d.jsonl")],
            text_field="body",
            val_fraction=0.1,
            seed=seed,
            cache_dir=str(tmp_path / cache),
        )
        data = prepare_data(cfg, log=quiet)
        return train_docs(data), val_docs(data)

    train, val = split(0, "a")
    assert len(val) == 4 and len(train) == 36
    assert sorted(train + val) == sorted(d.encode() for d in docs)  # whole documents, none lost
    assert split(0, "b") == (train, val)  # same seed, fresh cache: same split
    assert split(1, "c")[1] != val


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(DataError, match="validation"):
        prepare_data(DataConfig(train=[str(tmp_path / "one.txt")], cache_dir=str(tmp_path)), log=quiet)


def test_bundled_default(tmp_path):
    data = prepare_data(DataConfig(cache_dir=str(tmp_path)), log=quiet)
    assert 1_000_000 <= data.train_bytes <= 1_150_000
    assert len(val_docs(data)) == 2 and 150_000 <= data.val_bytes <= 250_000
    train = b"\n".join(train_docs(data))
    for path in sorted((BUNDLED_DIR / "val").glob("*.txt")):
        text = path.read_bytes()
        assert text in val_docs(data)
        assert text[:2000] not in train and text[-2000:] not in train
    assert b"Gutenberg" not in train and b"\r" not in train


def test_cache_is_reused(tmp_path):
    logs = []
    cfg = DataConfig(cache_dir=str(tmp_path))
    first = prepare_data(cfg, log=logs.append)
    shard = first.sources[0].data.root / "shards" / f"{first.sources[0].data.shards[0].id}.train.bin"
    mtime = os.stat(shard).st_mtime_ns
    second = prepare_data(cfg, log=logs.append)
    assert second.sources[0].data.manifest == first.sources[0].data.manifest and os.stat(shard).st_mtime_ns == mtime
    assert "nothing new to build" in logs[-1] and "built" in logs[1]


def test_a_glob_through_a_symlink_loop_reads_each_file_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("the one document of x")
    (tmp_path / "a" / "y.txt").write_text("the one document of y")
    (tmp_path / "a" / "back").symlink_to("..")  # a/back/a/back/... : x.txt by 40 names
    (tmp_path / "y_link.txt").symlink_to(tmp_path / "a" / "y.txt")
    cfg = DataConfig(train=[str(tmp_path / "**" / "*.txt")], val_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, log=quiet)
    files = [f["path"] for s in data.sources[0].data.shards for f in s.files]
    assert files == [str(tmp_path / "a" / "x.txt"), str(tmp_path / "y_link.txt")]  # each once, by its shortest name
    assert sorted(train_docs(data) + val_docs(data)) == [b"the one document of x", b"the one document of y"]


# ----------------------------------------------------------------------------- errors


def one_line_error(cfg, *names):
    with pytest.raises(DataError) as info:
        prepare_data(cfg, log=quiet)
    msg = str(info.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg
    return msg


def test_errors_name_the_file(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("fine text")

    def cfg(train):
        return DataConfig(train=[str(train)], val=[str(ok)], cache_dir=str(tmp_path / "cache"))

    one_line_error(cfg(tmp_path / "missing.txt"), "missing.txt", "matches no file")
    one_line_error(cfg(tmp_path / "nope" / "*.txt"), "*.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    one_line_error(cfg(tmp_path / "empty.txt"), "empty.txt", "no text")
    (tmp_path / "blob.txt").write_bytes(b"\x7fELF\x00\x00\x01" + bytes(range(256)))
    one_line_error(cfg(tmp_path / "blob.txt"), "blob.txt", "binary")
    (tmp_path / "rows.jsonl").write_text('{"content": "x"}\n')
    one_line_error(cfg(tmp_path / "rows.jsonl"), "rows.jsonl", "'text'", "data.text_field")
    (tmp_path / "broken.jsonl").write_bytes(b"\x00\x01 not json")
    one_line_error(cfg(tmp_path / "broken.jsonl"), "broken.jsonl", "not valid")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not parquet")
    one_line_error(cfg(tmp_path / "broken.parquet"), "broken.parquet", "not valid Parquet")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    one_line_error(cfg(tmp_path / "broken.jsonl.gz"), "broken.jsonl.gz", "not valid gz")
    (tmp_path / "empty_val.txt").write_bytes(b"")
    one_line_error(
        DataConfig(train=[str(ok)], val=[str(tmp_path / "empty_val.txt")], cache_dir=str(tmp_path / "cache")),
        "empty_val.txt",
        "data.val",
    )
    for d in (tmp_path / "cache" / "data").iterdir():  # failed builds leave nothing; the good one is complete
        assert (d / "manifest.json").is_file() and not list(d.rglob(".*tmp*"))


# ----------------------------------------------------------------------------- evaluation windows


def stream(n=5000):
    """Token i has value i, so a window shows where it came from (the windows never look at values)."""
    return np.arange(n, dtype=np.uint16)


@pytest.mark.parametrize("n,max_tokens", [(1000, None), (1025, None), (1000, 300), (1000, 5000), (2, None)])
def test_eval_windows_cover_each_target_once(n, max_tokens):
    tokens = stream(n)
    seq_len, batch_size = 64, 3
    targets, expected = [], min(n - 1, max_tokens or n)
    for batch in eval_windows(tokens, seq_len, batch_size, max_tokens):
        assert batch.shape[1] == seq_len + 1 and batch.shape[0] <= batch_size
        for row in batch.numpy():
            real = row[1:][row[1:] != PAD_ID]
            assert (row[1:][len(real) :] == PAD_ID).all()  # padding only at the right end
            targets.extend(real.tolist())
    assert targets == tokens[1 : 1 + expected].tolist()
    assert list(eval_windows(tokens[:1], seq_len, batch_size)) == []
