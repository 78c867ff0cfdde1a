"""Data at scale on this machine: `blt prepare` against a plain `datasets.map` ingest, the training
stream (Grain) against an HF datasets stream, data time in a training step, time to the first step
and peak memory with a large corpus against a small one, and entropy precompute on 1 and 2 ranks.
Prints a Markdown table.

    python bench/data.py                  # the README numbers: ~250 MB of text already on the machine
    python bench/data.py --mb 40          # a quicker look

The corpus is every .py, .pyi, .txt, .md and .rst file of the installed Python packages, the
standard library and /usr/share/doc (one document per file; files with NUL bytes skipped), in
path order up to --mb MB; nothing is downloaded. Runs go to bench_runs/data/ (replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blt.data.prepare import prepare  # noqa: E402

EXTENSIONS = (".py", ".pyi", ".txt", ".md", ".rst")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def corpus_files(mb: float) -> list[str]:
    """Text files already on the machine, in path order, up to `mb` MB (NUL-free, non-empty)."""
    roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"], "/usr/share/doc"})
    files, total = [], 0
    for root in roots:
        for dirpath, dirnames, names in sorted(os.walk(root)):
            dirnames.sort()
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                if not name.endswith(EXTENSIONS) or not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    head = f.read(8192)
                size = os.path.getsize(path)
                if size == 0 or b"\0" in head:
                    continue
                files.append(path)
                total += size
                if total >= mb * 1e6:
                    return files
    return files


def mb_of(files: list[str]) -> float:
    return sum(os.path.getsize(f) for f in files) / 1e6


def time_prepare(files: list[str], out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    prepare(files, out, workers=workers, log=lambda s: None)
    return time.perf_counter() - t0


def time_datasets_map(files: list[str], cache: Path, num_proc: int | None) -> float:
    """The plain HF way: the `text` builder (one document per file), then a batched map to byte ids."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    shutil.rmtree(cache, ignore_errors=True)

    def to_ids(batch):
        return {"ids": [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint16) + 4 for t in batch["text"]]}

    t0 = time.perf_counter()
    ds = datasets.load_dataset(
        "text", data_files=files, sample_by="document", split="train", cache_dir=str(cache), encoding_errors="replace"
    )
    ds.map(to_ids, batched=True, remove_columns=["text"], num_proc=num_proc)
    secs = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    return secs


def grain_stream(dirs: list[Path], seq_len: int, batch: int, n: int, prefetch: int) -> tuple[float, float]:
    """(MB/s of n batches, seconds to resume at batch n) for blt's StreamLoader (Grain)."""
    from blt.data import Source, StreamLoader
    from blt.data.shards import Prepared

    weights = [0.5, 0.3, 0.2][: len(dirs)]
    sources = [Source(f"s{i}", w, Prepared.open(d)) for i, (d, w) in enumerate(zip(dirs, weights))]
    for s in sources:  # steady state: every block's checksum verified (verify_rate times that)
        for k in range(len(s.data.shards)):
            s.data.tokens(k, "train")
    ld = StreamLoader(sources, seq_len, batch, 0, prefetch=prefetch)
    next(ld)
    t0 = time.perf_counter()
    for _ in range(n):
        next(ld)
    secs = time.perf_counter() - t0
    state = ld.state_dict()
    t1 = time.perf_counter()
    again = StreamLoader(ld.sources, seq_len, batch, 0, prefetch=prefetch)
    again.load_state_dict(state)
    next(again)
    return n * batch * seq_len / secs / 1e6, time.perf_counter() - t1


def verify_rate(root: Path) -> float:
    """MB/s of a process's first read of a prepared directory's train ids: each 4 MB block's sha256
    checked once (the page cache holds the shards)."""
    from blt.data.shards import Prepared

    data = Prepared.open(root)
    t0 = time.perf_counter()
    n = sum(len(data.tokens(k, "train")) for k in range(len(data.shards)))
    return 2 * n / (time.perf_counter() - t0) / 1e6


def hf_stream(dirs: list[Path], seq_len: int, batch: int, n: int) -> tuple[float, float]:
    """The same stream the HF way: per source an IterableDataset of windows (from_generator,
    shuffle buffer), interleave_datasets by probability, split_dataset_by_node, state_dict."""
    import datasets
    import numpy as np
    from datasets.distributed import split_dataset_by_node

    from blt.data.shards import Prepared

    def windows(roots):
        for root in roots:
            data = Prepared.open(root)
            for k in range(len(data.shards)):
                ids = data.tokens(k, "train")
                for j in range((len(ids) - 1) // seq_len):
                    yield {"ids": np.asarray(ids[j * seq_len : j * seq_len + seq_len + 1], dtype=np.int64)}

    def build():
        parts = [
            datasets.IterableDataset.from_generator(windows, gen_kwargs={"roots": [str(d)]}).shuffle(
                seed=i, buffer_size=1000
            )
            for i, d in enumerate(dirs)
        ]
        mix = (
            datasets.interleave_datasets(
                parts, probabilities=[0.5, 0.3, 0.2][: len(dirs)], seed=0, stopping_strategy="all_exhausted"
            )
            if len(parts) > 1
            else parts[0]
        )
        return split_dataset_by_node(mix, rank=0, world_size=1)  # no with_format("numpy"): 10x slower

    ds = build()
    it = iter(ds)
    for _ in range(batch):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n * batch):
        next(it)
    secs = time.perf_counter() - t0
    state = ds.state_dict()
    t1 = time.perf_counter()
    again = build()
    again.load_state_dict(state)
    next(iter(again))
    return n * batch * seq_len / secs / 1e6, time.perf_counter() - t1


FIRST_STEP = """
import json, resource, sys, time
from blt.config import load_config
from blt.train.loop import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:])
t0 = time.perf_counter()
trainer = Trainer(cfg)
trainer.accumulate()
print(json.dumps({"first_step_s": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def first_step(source: Path, run: Path) -> dict:
    """Seconds from building the trainer (after imports) to the end of the first forward/backward,
    and the process's peak RSS, training the tiny BLT (static patching) on a prepared source."""
    shutil.rmtree(run, ignore_errors=True)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            FIRST_STEP,
            str(ROOT / "configs" / "tiny.yaml"),
            f"run_dir={run}",
            "patching.mode=static",
            "logging.progress=false",
            "logging.wandb.mode=disabled",
            f"data.sources=[{{name: corpus, path: [{source}]}}]",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_share(source: Path, run: Path, steps: int) -> tuple[float, float]:
    """(median data seconds per step, median step seconds) of a short tiny-BLT run (static patching)."""
    shutil.rmtree(run, ignore_errors=True)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blt",
            "train",
            str(ROOT / "configs" / "tiny.yaml"),
            f"run_dir={run}",
            "patching.mode=static",
            "logging.progress=false",
            f"training.steps={steps}",
            "logging.every=1",
            "eval.every=0",
            "eval.max_bytes=4096",
            "logging.samples=0",
            "logging.images=false",
            f"data.sources=[{{name: corpus, path: [{source}]}}]",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=1800,
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps_ = [m for m in lines if "time_data_s" in m][2:]  # the first steps warm up
    return statistics.median(m["time_data_s"] for m in steps_), statistics.median(m["step_time_s"] for m in steps_)


def entropy_rate(source: Path, out: Path, model: Path, ranks: int) -> float:
    """Bytes/s of `blt prepare --entropy-model` on `ranks` CPU processes (torchrun)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    shutil.rmtree(out / "entropies", ignore_errors=True)
    cmd = [sys.executable, "-m", "blt", "prepare", "--out", str(out), "--entropy-model", str(model), "--seq-len", "512"]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", *cmd[2:]]
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": str(2 // ranks)}, timeout=3600
    )
    secs = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["entropy_bytes_computed"] / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=250, help="corpus size in MB")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each timing (alternated; medians)")
    ap.add_argument("--out", default="bench_runs/data")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    files = corpus_files(args.mb)
    small = corpus_files(2)
    size = mb_of(files)
    for f in files:  # the page cache holds the corpus for every contender
        Path(f).read_bytes()
    print(
        f"corpus: {len(files):,} files, {size:,.1f} MB; small corpus {len(small):,} files, {mb_of(small):.1f} MB",
        file=sys.stderr,
    )

    rows = []
    times: dict[str, list[float]] = {"prepare_1": [], "prepare_2": [], "map_1": [], "map_2": []}
    for _ in range(args.repeats):  # A B C D, A B C D, ...
        times["prepare_1"].append(time_prepare(files, out / "p1", 1))
        times["prepare_2"].append(time_prepare(files, out / "p2", 2))
        times["map_1"].append(time_datasets_map(files, out / "hf", None))
        times["map_2"].append(time_datasets_map(files, out / "hf", 2))
    rate = {k: size / statistics.median(v) for k, v in times.items()}
    rows += [
        ("`blt prepare`, 1 worker", f"{rate['prepare_1']:.1f} MB/s"),
        ("`blt prepare`, 2 workers", f"{rate['prepare_2']:.1f} MB/s"),
        ("`datasets` text builder + `map`, 1 process", f"{rate['map_1']:.1f} MB/s"),
        ("`datasets` text builder + `map`, num_proc=2", f"{rate['map_2']:.1f} MB/s"),
        ("`blt prepare` 2 workers / `datasets.map`", f"{rate['prepare_2'] / rate['map_1']:.2f}x"),
    ]

    big = out / "p1"
    prepare(small, out / "small", log=lambda s: None)
    prepare(small, out / "small_sharded", shard_mb=0.25, log=lambda s: None)  # 8 shards: work for 2 ranks
    rows.append(
        (
            "first read of each 4 MB block (sha256 checked, once per process)",
            f"{statistics.median(verify_rate(big) for _ in range(args.repeats)):.0f} MB/s",
        )
    )
    batch = 8
    for seq_len in (512, 4096):
        n = 3000 * 512 // seq_len
        g1 = [grain_stream([big], seq_len, batch, n, 0) for _ in range(args.repeats)]
        g3 = [grain_stream([big, big, big], seq_len, batch, n, 0) for _ in range(args.repeats)]
        rows += [
            (
                f"stream, 1 source, {batch} x {seq_len} bytes (Grain, blt; blocks verified)",
                f"{statistics.median(r for r, _ in g1):.0f} MB/s per rank",
            ),
            (
                f"stream, 3-source mixture, {batch} x {seq_len} bytes (Grain, blt; blocks verified)",
                f"{statistics.median(r for r, _ in g3):.0f} MB/s per rank",
            ),
        ]
        if seq_len == 512:
            h3 = [hf_stream([big, big, big], seq_len, batch, 300) for _ in range(args.repeats)]
            rows += [
                (
                    f"stream, 3-source mixture, {batch} x {seq_len} bytes (HF interleave_datasets)",
                    f"{statistics.median(r for r, _ in h3):.0f} MB/s per rank",
                ),
                (
                    "resume the mixture after 3,000 batches: Grain / HF",
                    f"{statistics.median(s for _, s in g3) * 1e3:.1f} ms / "
                    f"{statistics.median(s for _, s in h3) * 1e3:.0f} ms",
                ),
            ]

    data_s, step_s = step_share(big, out / "run_steps", 30)
    rows.append(
        (
            "data time per tiny-BLT step (static patching)",
            f"{data_s * 1e3:.2f} ms of {step_s * 1e3:.0f} ms ({100 * data_s / step_s:.2f}%)",
        )
    )

    firsts: dict[str, list[dict]] = {"big": [], "small": []}
    for _ in range(args.repeats):
        firsts["big"].append(first_step(big, out / "run_first"))
        firsts["small"].append(first_step(out / "small", out / "run_first"))
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("first_step_s", "peak_rss_mb")} for k, v in firsts.items()
    }
    rows += [
        (
            f"time to first step, {size:.0f} MB / {mb_of(small):.0f} MB corpus",
            f"{med['big']['first_step_s']:.2f} s / {med['small']['first_step_s']:.2f} s "
            f"({med['big']['first_step_s'] / med['small']['first_step_s']:.2f}x)",
        ),
        (
            f"peak RSS, {size:.0f} MB / {mb_of(small):.0f} MB corpus",
            f"{med['big']['peak_rss_mb']:.0f} MB / {med['small']['peak_rss_mb']:.0f} MB "
            f"(+{med['big']['peak_rss_mb'] - med['small']['peak_rss_mb']:.0f} MB)",
        ),
    ]

    model = out / "entropy_model"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "blt",
            "train",
            str(ROOT / "configs" / "entropy_tiny.yaml"),
            f"run_dir={model}",
            "training.steps=20",
            "logging.progress=false",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    ent = {1: [], 2: []}
    for _ in range(max(1, args.repeats - 1)):
        for ranks in (1, 2):
            ent[ranks].append(entropy_rate(out / "small_sharded", out / f"ent{ranks}", model, ranks))
    rows += [
        (
            f"entropy precompute, {ranks} rank(s) (CPU, entropy_tiny, 2 MB in 8 shards, process start included)",
            f"{statistics.median(v) / 1e3:.0f} KB/s",
        )
        for ranks, v in ent.items()
    ]

    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
