"""The data pipeline: exact bytes in the packed stream, cached splits, resumable batches."""

import json
import os

import numpy as np
import pytest
import torch

from blt.config import DataConfig
from blt.data import (
    BOS_ID, EOS_ID, OFFSET, PAD_ID, BUNDLED_DIR, ByteLoader, DataError, decode, encode, encode_files,
    eval_windows, prepare_data, read_tokens,
)


def quiet(_msg):
    pass


def packed_docs(tokens) -> list[bytes]:
    """Split a packed stream back into its documents' bytes."""
    arr = np.asarray(tokens)
    starts, ends = np.flatnonzero(arr == BOS_ID), np.flatnonzero(arr == EOS_ID)
    assert len(starts) == len(ends)
    return [decode(arr[s + 1: e]) for s, e in zip(starts, ends)]


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["gamma", "delta delta"]}), tmp_path / "rows.parquet")
    val_text = "held out text"
    (tmp_path / "val.txt").write_text(val_text)

    cfg = DataConfig(train=[str(tmp_path / "doc*.txt"), str(tmp_path / "rows.jsonl"), str(tmp_path / "rows.parquet")],
                     val=[str(tmp_path / "val.txt")], cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, log=quiet)
    expected = docs_txt + [b"alpha", "βeta 🙂".encode(), b"gamma", b"delta delta"]  # the empty row is dropped
    assert data.train.num_docs == len(expected)
    assert data.train.num_tokens == sum(len(d) + 2 for d in expected)
    train = read_tokens(data.train)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and len(train) == data.train.num_tokens
    assert packed_docs(train) == expected  # files in sorted order, rows in file order
    assert packed_docs(read_tokens(data.val)) == [val_text.encode()]
    assert json.loads((data.dir / "meta.json").read_text())["train"]["tokens"] == data.train.num_tokens
    assert not list((tmp_path / "cache" / "data").glob(".tmp-*"))  # no temp dir left behind
    assert not (data.dir / "hf_cache").exists()


def test_invalid_utf8_and_crlf_survive_exactly(tmp_path):
    raw = b"line one\r\nbad \xff\xfe\x80 bytes\r\n\xc3(\n"
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "b.txt").write_bytes(b"other")
    cfg = DataConfig(train=[str(tmp_path / "a.txt")], val=[str(tmp_path / "b.txt")], cache_dir=str(tmp_path))
    data = prepare_data(cfg, log=quiet)
    assert packed_docs(read_tokens(data.train)) == [raw]
    assert np.array_equal(encode_files([str(tmp_path / "a.txt")]), encode(raw))


def test_sample_by_paragraph_and_line(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"p1 a\np1 b\n\np2\n\n\n\np3\n")
    (tmp_path / "v.txt").write_bytes(b"v")
    base = dict(train=[str(tmp_path / "t.txt")], val=[str(tmp_path / "v.txt")], cache_dir=str(tmp_path))
    para = prepare_data(DataConfig(**base, sample_by="paragraph"), log=quiet)
    assert packed_docs(read_tokens(para.train)) == [b"p1 a\np1 b", b"p2", b"p3\n"]
    line = prepare_data(DataConfig(**base, sample_by="line"), log=quiet)
    assert packed_docs(read_tokens(line.train)) == [b"p1 a", b"p1 b", b"p2", b"p3"]


def test_val_split_is_by_document_and_deterministic(tmp_path):
    docs = [f"document number {i} " * (i + 1) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))

    def split(seed, cache):
        cfg = DataConfig(train=[str(tmp_path / "d.jsonl")], text_field="body", val_fraction=0.1, seed=seed,
                         cache_dir=str(tmp_path / cache))
        data = prepare_data(cfg, log=quiet)
        return packed_docs(read_tokens(data.train)), packed_docs(read_tokens(data.val))

    train, val = split(0, "a")
    assert len(val) == 4 and len(train) == 36
    assert sorted(train + val) == sorted(d.encode() for d in docs)  # whole documents, none lost
    assert split(0, "b") == (train, val)  # same seed, fresh cache: same split
    assert split(1, "c")[1] != val


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(DataError, match="data.val"):
        prepare_data(DataConfig(train=[str(tmp_path / "one.txt")], cache_dir=str(tmp_path)), log=quiet)


def test_bundled_default(tmp_path):
    data = prepare_data(DataConfig(cache_dir=str(tmp_path)), log=quiet)
    assert 1_000_000 <= data.train.num_tokens <= 1_150_000
    assert data.val.num_docs == 2 and 150_000 <= data.val.num_tokens <= 250_000
    train = b"\n".join(packed_docs(read_tokens(data.train)))
    for path in sorted((BUNDLED_DIR / "val").glob("*.txt")):
        text = path.read_bytes()
        assert text in packed_docs(read_tokens(data.val))
        assert text[:2000] not in train and text[-2000:] not in train
    assert b"Gutenberg" not in train and b"\r" not in train


def test_cache_is_reused(tmp_path):
    logs = []
    cfg = DataConfig(cache_dir=str(tmp_path))
    first = prepare_data(cfg, log=logs.append)
    mtime = os.stat(first.train.path).st_mtime_ns
    second = prepare_data(cfg, log=logs.append)
    assert second == first and os.stat(second.train.path).st_mtime_ns == mtime
    assert "reusing" in logs[-1] and "reusing" not in logs[0]


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
    (tmp_path / "empty_val.txt").write_bytes(b"")
    one_line_error(DataConfig(train=[str(ok)], val=[str(tmp_path / "empty_val.txt")], cache_dir=str(tmp_path)),
                   "empty_val.txt", "data.val")
    assert not list((tmp_path / "cache" / "data").glob("*"))  # failed builds leave nothing behind


# ----------------------------------------------------------------------------- loaders


def stream(n=5000):
    """Token i has value i, so a window shows where it came from (the loaders never look at values)."""
    return np.arange(n, dtype=np.uint16)


def test_loader_windows_and_resume():
    tokens = stream()
    loader = ByteLoader(tokens, seq_len=64, batch_size=4, seed=3)
    assert loader.num_windows == (5000 - 1) // 64
    first = [next(loader) for _ in range(3)]
    for x in first:
        assert x.shape == (4, 65) and x.dtype == torch.int64
        for row in x.numpy():  # window i is tokens[i * 64 : i * 64 + 65]
            assert row[0] % 64 == 0 and (row == np.arange(row[0], row[0] + 65)).all()
    assert loader.last_indices == (first[-1][:, 0] // 64).tolist()
    state = json.loads(json.dumps(loader.state_dict()))
    after = [next(loader) for _ in range(5)]
    restored = ByteLoader(tokens, seq_len=64, batch_size=4, seed=3)
    restored.load_state_dict(state)
    for a, b in zip(after, [next(restored) for _ in range(5)]):
        assert torch.equal(a, b)


def test_loader_crosses_epochs():
    loader = ByteLoader(stream(1 + 10 * 8), seq_len=8, batch_size=3, seed=0)  # exactly 10 windows
    seen = [int(x[0]) // 8 for _ in range(3) for x in next(loader)]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 9  # epoch 0: 9 distinct windows, 1 dropped
    assert seen == np.random.default_rng([0, 0]).permutation(10)[:9].tolist()
    x = next(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["index"] == 3
    assert (x[:, 0] // 8).tolist() == np.random.default_rng([0, 1]).permutation(10)[:3].tolist()


def test_loader_ranks_partition_the_global_batch():
    tokens = stream()
    single = ByteLoader(tokens, seq_len=32, batch_size=6, seed=7)
    ranks = [ByteLoader(tokens, seq_len=32, batch_size=3, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(60):  # several epochs of 156 windows
        assert torch.equal(next(single), torch.cat([next(r) for r in ranks]))


def test_loader_too_little_data():
    with pytest.raises(DataError, match="data.seq_len"):
        ByteLoader(stream(50), seq_len=64, batch_size=1, seed=0)
    with pytest.raises(DataError, match="batch"):
        ByteLoader(stream(500), seq_len=64, batch_size=8, seed=0)


@pytest.mark.parametrize("n,max_tokens", [(1000, None), (1025, None), (1000, 300), (1000, 5000), (2, None)])
def test_eval_windows_cover_each_target_once(n, max_tokens):
    tokens = stream(n)
    seq_len, batch_size = 64, 3
    targets, expected = [], min(n - 1, max_tokens or n)
    for batch in eval_windows(tokens, seq_len, batch_size, max_tokens):
        assert batch.shape[1] == seq_len + 1 and batch.shape[0] <= batch_size
        for row in batch.numpy():
            real = row[1:][row[1:] != PAD_ID]
            assert (row[1:][len(real):] == PAD_ID).all()  # padding only at the right end
            targets.extend(real.tolist())
    assert targets == tokens[1: 1 + expected].tolist()
    assert list(eval_windows(tokens[:1], seq_len, batch_size)) == []
