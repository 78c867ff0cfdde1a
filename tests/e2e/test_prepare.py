"""`blt prepare` and the training stream: shards that do not depend on the worker count, incremental
and partial prepares, a lock, interrupted runs, damaged shards; weighted mixtures, exact and
elastic resume of the stream; prepared entropies."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blt.config import ConfigError, load_config
from blt.data import DataError, Source, StreamLoader
from blt.data.prepare import prepare
from blt.data.shards import Prepared, dir_lock

from badinput import assert_user_error, kill_midway
from conftest import CONFIGS, ROOT, TINY_BLT, read_metrics, run_cli
from corpora import make_corpus, quiet

slow = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def snapshot(out: Path) -> dict[str, bytes]:
    """Every shard file and the manifest of a prepared dir, by name."""
    files = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    return {**files, "manifest.json": (out / "manifest.json").read_bytes()}


def cli_prepare(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blt", "prepare", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------- prepare


def test_workers_parts_and_reruns_give_the_same_shards(tmp_path, capsys):
    src = make_corpus(tmp_path / "src", 40, 3000)
    one = prepare([str(src)], tmp_path / "one", shard_mb=0.02, workers=1, log=quiet)
    assert len(one["shards"]) >= 5 and one["val"]["docs"] >= 5
    prepare([str(src)], tmp_path / "two", shard_mb=0.02, workers=2, log=quiet)
    assert snapshot(tmp_path / "two") == snapshot(tmp_path / "one")  # byte for byte, whatever the workers

    for k in (1, 2):  # two machines, each its part; the last to finish writes the one manifest
        code, out, err = run_cli(
            capsys, "prepare", src, "--out", tmp_path / "parts", "--shard-mb", 0.02, "--part", f"{k}/2"
        )
        assert code == 0, err
        if k == 1:
            assert "manifest is written when all 2 parts are" in err
            assert not (tmp_path / "parts" / "manifest.json").exists()
    assert snapshot(tmp_path / "parts") == snapshot(tmp_path / "one")

    assert prepare([str(src)], tmp_path / "one", shard_mb=0.02, log=quiet) == one  # a rerun changes nothing


def test_incremental_prepare_builds_only_new_and_changed_files(tmp_path):
    src = make_corpus(tmp_path / "src", 12, 3000)
    out = tmp_path / "out"
    first = prepare([str(src)], out, shard_mb=0.01, log=quiet)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    (src / "doc_0005b.txt").write_text("a new file, sorted between two old ones\n")
    logs: list[str] = []
    grown = prepare([str(src)], out, shard_mb=0.01, log=logs.append)
    assert f"1 of {len(first['shards']) + 1} shards to build" in logs[0]
    assert all(stamps[name] == (out / "shards" / name).stat().st_mtime_ns for name in stamps)  # untouched
    assert grown["train"]["docs"] + grown["val"]["docs"] == first["train"]["docs"] + first["val"]["docs"] + 1

    (src / "doc_0003.txt").write_text("changed text\n")
    (src / "doc_0007.txt").unlink()
    logs.clear()
    changed = prepare([str(src)], out, shard_mb=0.01, log=logs.append)
    # the shards that held them (4 files each) are rebuilt from their other files, the rest kept
    assert logs[0].startswith(f"prepare: 2 of {len(changed_shards := changed['shards'])} shards")
    ids = {s["id"] for s in changed_shards}
    assert {p.name.split(".")[0] for p in (out / "shards").iterdir()} == ids  # stale shards swept
    names = [Path(f["path"]).name for s in changed_shards for f in s["files"]]
    assert "doc_0007.txt" not in names and "doc_0003.txt" in names
    fresh = prepare([str(src)], tmp_path / "fresh", shard_mb=0.01, log=quiet)
    assert fresh["train"]["tokens"] + fresh["val"]["tokens"] == changed["train"]["tokens"] + changed["val"]["tokens"]


def test_a_second_writer_is_refused_and_nothing_is_corrupted(tmp_path):
    src = make_corpus(tmp_path / "src", 4, 2000)
    out = tmp_path / "out"
    out.mkdir()
    with dir_lock(out):  # a prepare holding the directory
        with pytest.raises(DataError, match="being written by another `blt prepare` .*pid"):
            prepare([str(src)], out, log=quiet)
    assert not (out / "manifest.json").exists()
    prepare([str(src)], out, log=quiet)  # once the first is done, it goes through
    Prepared.open(out)


def test_prepare_never_removes_a_file_it_did_not_write(tmp_path):
    """A rerun sweeps the shards it no longer needs, by the names its records give, and a failed first
    run takes back what it wrote; a user's file in --out or --out/shards (hidden, in a subfolder)
    stays, and a --out of other files or holding a source is refused before anything is written."""
    src = make_corpus(tmp_path / "src", 12, 3000)
    out = tmp_path / "out"
    first = prepare([str(src)], out, shard_mb=0.01, log=quiet)
    mine = {
        "README.md": b"my notes",
        "shards/.hidden": b"h",
        "shards/notes.txt": b"n",
        "shards/sub/x.jsonl": b"{}",
        "shards/.keep.tmp-1": b"t",
        "shards/0123456789abcdef0123.txt": b"not a shard's name",
    }
    for name, data in mine.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    (src / "doc_0003.txt").write_text("changed text\n")  # its shard is rebuilt under a new id, the old one swept
    second = prepare([str(src)], out, shard_mb=0.01, log=quiet)
    assert {s["id"] for s in first["shards"]} - {s["id"] for s in second["shards"]}
    assert {name: (out / name).read_bytes() for name in mine} == mine
    theirs = {"sub", *(Path(name).name for name in mine)}
    ids = {p.name.split(".")[0] for p in (out / "shards").iterdir() if p.name not in theirs}
    assert ids == {s["id"] for s in second["shards"]}  # the stale shard's files are gone

    (out / "inside.txt").write_text("text inside the prepared directory")
    for args, contains in [
        ((out / "inside.txt", "--out", out), "lies inside --out"),  # refused, nothing moved
        ((src, "--out", src / "prepared"), "lies inside the source"),
    ]:
        assert_user_error(["prepare", *args], watch=[tmp_path], contains=contains)

    empty = tmp_path / "e.txt"  # a failed first run leaves nothing in a new directory, and a user's empty
    empty.write_bytes(b"")  # directory empty
    new = tmp_path / "new" / "deeper"
    with pytest.raises(DataError, match="'.*e.txt' holds no text"):
        prepare([str(empty)], new, log=quiet)
    assert not (tmp_path / "new").exists()
    new.mkdir(parents=True)
    with pytest.raises(DataError, match="holds no text"):
        prepare([str(empty)], new, log=quiet)
    assert list(new.iterdir()) == []


RACER = """
import contextlib, io, json, os, sys, time
from blt.cli import main
import blt.train.distributed, blt.train.prepare_job  # imported before the start, so the two start together
src, base, rounds, me = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for r in range(rounds):
    open(f"{base}/ready-{r}-{me}", "w").close()
    while not os.path.exists(f"{base}/go-{r}"):
        time.sleep(0.0002)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(["prepare", src, "--out", f"{base}/out-{r}", "--shard-mb", "0.01"])
        except BaseException as e:
            rc, _ = 1, err.write(f"Traceback: {type(e).__name__}: {e}")
    print(json.dumps({"round": r, "rc": rc, "err": err.getvalue()}), flush=True)
"""


def test_two_prepares_started_together_on_a_new_out(tmp_path):
    """Two `blt prepare` processes on one new --out, released together (within a millisecond) in
    each of 12 rounds: both end well (exit 0), or one refuses in one line (exit 2) and the other
    makes the complete directory. Before, the refused one removed the directory it had created
    while the lock holder wrote into it, which died with FileNotFoundError (2 in 8 tries)."""
    src = make_corpus(tmp_path / "src", 30, 1000)
    prepare([str(src)], tmp_path / "reference", shard_mb=0.01, log=quiet)
    rounds, base = 12, tmp_path / "race"
    base.mkdir()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(src), str(base), str(rounds), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for i in range(2)
    ]
    try:
        for r in range(rounds):
            deadline = time.monotonic() + 120
            while not all((base / f"ready-{r}-{i}").exists() for i in range(2)):
                assert time.monotonic() < deadline and all(j.poll() is None for j in racers), "a racer died"
                time.sleep(0.001)
            (base / f"go-{r}").touch()
        results = [j.communicate(timeout=120) for j in racers]
    finally:
        for j in racers:
            j.kill()
    rows = [[json.loads(line) for line in out.splitlines()] for out, _ in results]
    assert all(len(r) == rounds for r in rows), [err[-2000:] for _, err in results]
    for r in range(rounds):
        codes = sorted(rows[i][r]["rc"] for i in range(2))
        assert codes in ([0, 0], [0, 2]), [rows[i][r] for i in range(2)]
        for i in range(2):
            if rows[i][r]["rc"] == 2:
                lines = rows[i][r]["err"].splitlines()
                assert len(lines) == 1 and "being written by another `blt prepare`" in lines[0], lines
        assert snapshot(base / f"out-{r}") == snapshot(tmp_path / "reference")
    assert any(sorted(rows[i][r]["rc"] for i in range(2)) == [0, 2] for r in range(rounds))  # they did collide


def test_kill_9_midway_then_rerun_finishes_the_same_shards(tmp_path):
    src = make_corpus(tmp_path / "src", 150, 40_000)  # 6 MB in 60 shards
    clean = tmp_path / "clean"
    prepare([str(src)], clean, shard_mb=0.1, log=quiet)
    out = tmp_path / "out"
    kill_midway(
        ["prepare", src, "--out", out, "--shard-mb", 0.1],
        lambda: len(list((out / "shards").glob("*.json"))) >= 3,
        out,
        env=ENV,
    )
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="no manifest.json"):  # nothing half-done is read
        Prepared.open(out)
    logs: list[str] = []
    prepare([str(src)], out, shard_mb=0.1, log=logs.append)
    done = len(list((clean / "shards").glob("*.json")))
    assert (
        "shards to build" in logs[0] and f" of {done} shards" in logs[0] and not logs[0].startswith(f"prepare: {done} ")
    )
    assert snapshot(out) == snapshot(clean)


def test_damaged_shards_and_manifests_are_named_in_one_line(tmp_path, cache_dir):
    src = make_corpus(tmp_path / "src", 6, 3000)
    out = tmp_path / "out"
    manifest = prepare([str(src)], out, log=quiet)  # one shard: the first batch reads it
    first = manifest["shards"][0]["id"]
    run_args = [
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={tmp_path / 'run'}",
        *TINY_BLT,
        "patching.mode=static",
        "training.steps=1",
        f"data.sources=[{{name: web, path: [{out}]}}]",
    ]

    shard = out / "shards" / f"{first}.train.bin"
    good = shard.read_bytes()
    assert all(set(s[split]) == {"tokens", "docs", "blocks"} for s in manifest["shards"] for split in ("train", "val"))
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # same size, one bit off
    with pytest.raises(DataError, match=f"{first}.train.bin' does not match its checksum"):
        Prepared.open(out).tokens(0, "train")
    # found when the first batch reads the shard, after the start line
    line = assert_user_error(
        run_args, contains=f"{first}.train.bin' does not match its checksum", progress=("data: ", "blt: ")
    )
    assert f"delete '{out / 'shards' / first}.json' and rerun `blt prepare`" in line
    (out / "shards" / f"{first}.json").unlink()  # as the message says: the rerun builds the shard again
    prepare([str(src)], out, log=quiet)
    assert shard.read_bytes() == good

    shard.write_bytes(good[:-10])  # truncated
    assert_user_error(run_args, contains=f"{first}.train.bin' has {len(good) - 10:,} bytes", progress=("data: ",))
    logs: list[str] = []
    prepare([str(src)], out, log=logs.append)  # the rerun the message asks for finds the shard and rebuilds it
    assert f"{first}.train.bin' has {len(good) - 10:,} bytes, not {len(good):,}; building it again" in logs[0]
    assert shard.read_bytes() == good
    Prepared.open(out).tokens(0, "train")

    data = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**data, "format": 1}))
    assert_user_error(run_args, contains="prepared in data format 1", progress=("data: ",))
    with pytest.raises(DataError, match="prepared in data format 1"):
        prepare([str(src)], out, log=quiet)


def test_a_reader_checks_each_block_it_touches(tmp_path):
    """Checksums cover 4 MB blocks: a corrupted block is named when a read first touches it, and
    reads elsewhere in the shard go on (start-up never hashes a whole corpus)."""
    from blt.data.shards import BLOCK

    src = make_corpus(tmp_path / "src", 3, 3_000_000)
    out = tmp_path / "out"
    prepare([str(src)], out, log=quiet)
    data = Prepared.open(out)
    shard = data.shards[0]
    assert len(shard.splits["train"]["blocks"]) >= 2
    path = out / "shards" / f"{shard.id}.train.bin"
    raw = bytearray(path.read_bytes())
    raw[BLOCK + 10] ^= 1  # one bit in block 1
    path.write_bytes(bytes(raw))
    data = Prepared.open(out)
    first = data.read(0, "train", 0, 1000)  # block 0 only
    assert len(first) == 1000
    with pytest.raises(
        DataError,
        match=rf"{shard.id}.train.bin' does not match its checksum \(corrupted at bytes "
        rf"{BLOCK:,}-",
    ):
        data.read(0, "train", BLOCK // 2 - 5, BLOCK // 2 + 5)  # ids that span blocks 0 and 1


def test_bad_sources_and_weights(tmp_path):
    src = make_corpus(tmp_path / "src", 3, 2000)

    def config(sources: str):
        return load_config(CONFIGS / "tiny.yaml", [f"data.sources={sources}", f"data.cache_dir={tmp_path}"])

    with pytest.raises(ConfigError, match=r"'data.sources\[0\].weight' must be >= 0"):
        config(f"[{{name: a, path: [{src}], weight: -1}}]")
    with pytest.raises(ConfigError, match="every weight is 0"):
        config(f"[{{name: a, path: [{src}], weight: 0}}, {{name: b, path: [{src}], weight: 0}}]")
    with pytest.raises(ConfigError, match="used twice"):
        config(f"[{{name: a, path: [{src}]}}, {{name: a, path: [{src}]}}]")
    with pytest.raises(ConfigError, match="replaces data.train"):
        load_config(CONFIGS / "tiny.yaml", [f"data.sources=[{{name: a, path: [{src}]}}]", f"data.train=[{src}]"])
    (tmp_path / "empty.txt").write_bytes(b"")
    from blt.data import prepare_data

    with pytest.raises(DataError, match=r"data.sources\[1\] \(b\): '.*empty.txt' holds no text"):
        prepare_data(
            config(f"[{{name: a, path: [{src}]}}, {{name: b, path: [{tmp_path / 'empty.txt'}]}}]").data, log=quiet
        )
    with pytest.raises(DataError, match=r"data.sources\[0\] \(a\): '.*nowhere' matches no file"):
        prepare_data(config(f"[{{name: a, path: [{tmp_path / 'nowhere'}]}}]").data, log=quiet)
    assert config(f"[{{name: a, path: {src}}}]").data.sources[0].path == [str(src)]  # one path: a list of one
    with pytest.raises(DataError, match="--part '3/2' is not K/N"):
        prepare([str(src)], tmp_path / "out", part="3/2", log=quiet)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(sources, the directory prepared from them), to copy and damage."""
    root = tmp_path_factory.mktemp("prepared")
    src = make_corpus(root / "src", 4, 2000)
    prepare([str(src)], root / "out", log=quiet)
    return src, root / "out"


def edited(change):
    """A case: a copy of the prepared directory whose manifest `change` edits (a dict, or the new text)."""

    def make(tmp: Path, src: Path, good: Path) -> Path:
        out = tmp / "edited"
        shutil.copytree(good, out)
        manifest = json.loads((good / "manifest.json").read_text())
        text = change(manifest)
        (out / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(manifest))
        return out

    return make


def files_in(*names):
    """A case: a directory of a user's files (none of them written by blt)."""

    def make(tmp: Path, src: Path, good: Path) -> Path:
        for name in names:
            (tmp / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "mine" / name).write_text(json.dumps({"text": f"my file {name}"}) + "\n")
        return tmp / "mine"

    return make


def unfinished(tmp: Path, src: Path, good: Path) -> Path:
    """A case: a prepared directory whose `blt prepare` was stopped before its manifest."""
    shutil.copytree(good, tmp / "unfinished")
    (tmp / "unfinished" / "manifest.json").unlink()
    return tmp / "unfinished"


def new_dir(tmp: Path, src: Path, good: Path) -> Path:
    return tmp / "new"


TRAIN = ["train", CONFIGS / "tiny.yaml", *TINY_BLT, "training.steps=1"]
# (make the case's directory D, the command with {D}, {SRC} and {GOOD} in it, part of the one-line message)
BAD_PREPARED = [
    pytest.param(
        new_dir,
        ["prepare", "{SRC}", "--out", "{D}", "--seed", "-1"],
        "--seed must be in [0, 2**32), got -1",
        id="seed-negative",
    ),
    pytest.param(
        new_dir,
        ["prepare", "{SRC}", "--out", "{D}", "--shard-mb", "nan"],
        "--shard-mb must be a finite number, got nan",
        id="shard_mb-nan",
    ),
    pytest.param(
        new_dir,
        ["prepare", "{SRC}", "--out", "{D}", "--shard-mb", "inf"],
        "--shard-mb must be a finite number, got inf",
        id="shard_mb-inf",
    ),
    pytest.param(
        new_dir,
        ["prepare", "{SRC}", "--out", "{D}", "--shard-mb", "0"],
        "--shard-mb must be > 0, got 0.0",
        id="shard_mb-0",
    ),
    pytest.param(
        new_dir,
        ["prepare", "{SRC}", "--out", "{D}", "--shard-mb", "-1"],
        "--shard-mb must be > 0, got -1.0",
        id="shard_mb-negative",
    ),
    pytest.param(
        new_dir, ["prepare", "{SRC}", "--out", "{D}", "--workers", "0"], "--workers must be >= 1, got 0", id="workers-0"
    ),
    pytest.param(
        new_dir,
        ["prepare", "{SRC}", "--out", "{D}", "--workers", "-1"],
        "--workers must be >= 1, got -1",
        id="workers-negative",
    ),
    # --out: only a new or empty directory, or one blt prepare made; a bad manifest leaves no .lock or shards/
    pytest.param(
        edited(lambda m: "{not json"),
        ["prepare", "{SRC}", "--out", "{D}"],
        "manifest.json' cannot be read (JSONDecodeError)",
        id="manifest-not-json",
    ),
    pytest.param(
        edited(lambda m: "[1, 2]"),
        ["prepare", "{SRC}", "--out", "{D}"],
        "manifest.json' is not a manifest of `blt prepare` ([1, 2] (a list))",
        id="manifest-a-list",
    ),
    pytest.param(
        edited(lambda m: '{"name": "my project"}'),
        ["prepare", "{SRC}", "--out", "{D}"],
        "is not a manifest of `blt prepare`",
        id="manifest-foreign-object",
    ),
    pytest.param(
        edited(lambda m: m.update(format="2")),
        ["prepare", "{SRC}", "--out", "{D}"],
        "prepared in data format '2' (a string), but this blt reads format 2",
        id="prepare-format-string",
    ),
    pytest.param(
        files_in("notes.txt"),
        ["prepare", "{SRC}", "--out", "{D}"],
        "holds files but is not a prepared directory",
        id="out-of-user-files",
    ),
    pytest.param(
        files_in("shards/a.jsonl", "shards/b.jsonl", "shards/.hidden"),
        ["prepare", "{D}/shards", "--out", "{D}"],
        "lies inside --out",
        id="source-inside-out",
    ),
    pytest.param(
        files_in("a.txt"), ["prepare", "{D}", "--out", "{D}"], "--out '{D}' is the source", id="out-is-source"
    ),
    pytest.param(
        files_in("a.txt"), ["prepare", "{D}", "--out", "{D}/prepared"], "lies inside the source", id="out-inside-source"
    ),
    pytest.param(
        new_dir,
        ["prepare", "{GOOD}", "--out", "{D}"],
        "is a prepared directory (from `blt prepare`), not input files",
        id="source-is-prepared",
    ),
    # a hand-edited manifest, found when the data is opened (before the model is built)
    pytest.param(
        edited(lambda m: m.pop("shards")),
        [*TRAIN, "data.train=[{D}]"],
        "'shards' is not a list",
        id="manifest-without-shards",
    ),
    pytest.param(
        edited(lambda m: m["shards"][0]["train"].update(tokens="abc")),
        [*TRAIN, "data.train=[{D}]"],
        "shards[0] train 'tokens' is 'abc' (a string), not a count",
        id="manifest-tokens-string",
    ),
    pytest.param(
        edited(lambda m: m["shards"][0]["train"].update(blocks=[])),
        [*TRAIN, "data.train=[{D}]"],
        "shards[0] train 'blocks' is [] (a list), not 1 checksum(s)",
        id="manifest-blocks-empty",
    ),
    pytest.param(
        edited(lambda m: m.update(format="2")),
        [*TRAIN, "data.train=[{D}]"],
        "format '2' (a string), but this blt reads format 2",
        id="train-format-string",
    ),
    # a prepared directory where files are expected: say so, not "set data.text_field"
    pytest.param(
        new_dir,
        [*TRAIN, "data.sources=[{name: a, path: [{GOOD}, {SRC}/rows.jsonl]}]"],
        "data.sources[0] (a): '{GOOD}' is a prepared directory",
        id="sources-mix-prepared-and-file",
    ),
    pytest.param(
        unfinished,
        [*TRAIN, "data.train=[{D}]"],
        "is the output of a `blt prepare` that did not finish",
        id="train-on-unfinished-prepare",
    ),
]


@pytest.mark.parametrize("make,args,contains", BAD_PREPARED)
def test_bad_prepare_inputs_fail_in_one_line(make, args, contains, prepared, tmp_path, cache_dir):
    src, good = prepared
    fill = {"{D}": str(make(tmp_path, src, good)), "{SRC}": str(src), "{GOOD}": str(good)}

    def text(a) -> str:
        return functools.reduce(lambda t, kv: t.replace(*kv), fill.items(), str(a))

    extra = [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}"] if args[0] == "train" else []
    line = assert_user_error(
        [*map(text, args), *extra], watch=[tmp_path, good], contains=text(contains), progress=("data: ",)
    )
    assert "text_field" not in line


# ----------------------------------------------------------------------------- the training stream


def test_training_on_a_mixture_logs_bytes_and_validation_per_source(three, tmp_path, capsys):
    sources = ", ".join(f"{{name: {n}, path: [{p.root}], weight: {w}}}" for n, p, w in zip("abc", three, (5, 3, 2)))
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={run}",
        *TINY_BLT,
        "patching.mode=static",
        "training.steps=5",
        f"data.sources=[{sources}]",
        "logging.data_trace=true",
    )
    assert code == 0, err
    metrics = read_metrics(run)
    last = [m for m in metrics if "data/bytes/a" in m][-1]
    seen = [last[f"data/bytes/{n}"] for n in "abc"]
    assert sum(seen) == 5 * 4 * 64  # steps x global batch x seq_len
    assert np.abs(np.array(seen) / sum(seen) - [0.5, 0.3, 0.2]).max() <= 1 / 20 + 1e-9  # within one window
    val = [m for m in metrics if "val_bpb" in m][-1]
    per = [val[f"val/bpb/{n}"] for n in "abc"]
    assert all(np.isfinite(per)) and min(per) <= val["val_bpb"] <= max(per)


# ----------------------------------------------------------------------------- entropies


def test_prepared_entropies_equal_the_ones_computed_per_batch(tmp_path, entropy_run, capsys):
    src = make_corpus(tmp_path / "src", 8, 3000)
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "prepare", src, "--out", out, "--shard-mb", 0.01, "--entropy-model", entropy_run, "--seq-len", 64
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["entropy_bytes_computed"] == report["train_bytes"]
    from blt.data.entropies import EntropyStore, model_fingerprint
    from blt.train.prepare_job import entropy_patcher

    patcher = entropy_patcher(str(entropy_run), 0)
    data = Prepared.open(out)
    store = EntropyStore(data, model_fingerprint(patcher.model), 64)
    assert str(store.dir) == report["entropies"]
    ld = StreamLoader([Source("a", 1.0, data)], 64, 8, 0)
    ld.use_entropies([store.load()])
    for _ in range(4):
        batch = next(ld)
        on_the_fly = patcher.entropies(batch.tokens[:, :-1])  # (B, L)
        torch.testing.assert_close(batch.entropies, on_the_fly.half().float(), atol=2e-3, rtol=0)

    code, _, err = run_cli(capsys, "prepare", "--out", out, "--entropy-model", entropy_run, "--seq-len", 64)
    assert code == 0 and "0 of" in err  # a rerun skips finished shards

    run_args = [
        "train",
        CONFIGS / "tiny.yaml",
        f"run_dir={tmp_path / 'run'}",
        *TINY_BLT,
        "data.seq_len=32",
        f"patching.entropy_model={entropy_run}",
        "training.steps=1",
        f"data.sources=[{{name: a, path: [{out}]}}]",
    ]
    assert_user_error(run_args, contains="data.seq_len=64, not by patching.entropy_model", progress=("data: ",))


@slow
def test_entropies_on_two_ranks_equal_one_rank(tmp_path, entropy_run):
    src = make_corpus(tmp_path / "src", 8, 3000)
    for d in ("one", "two"):
        prepare([str(src)], tmp_path / d, shard_mb=0.005, log=quiet)
    done = cli_prepare("--out", tmp_path / "one", "--entropy-model", entropy_run, "--seq-len", 64)
    assert done.returncode == 0, done.stderr
    from blt.net import free_port

    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "blt",
            "prepare",
            "--out",
            str(tmp_path / "two"),
            "--entropy-model",
            str(entropy_run),
            "--seq-len",
            "64",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ones = sorted((tmp_path / "one" / "entropies").rglob("*.f16"))
    twos = sorted((tmp_path / "two" / "entropies").rglob("*.f16"))
    assert len(ones) == len(twos) >= 4
    for a, b in zip(ones, twos):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
