"""Resuming on another layout: how long the universal conversion and the resume take. Trains
configs/tiny.yaml for a few steps as 2 processes at ZeRO-2, converts the checkpoint to its universal
form (`blt consolidate --universal`), then resumes it one step further on 1 process and on 2
processes at ZeRO-3, against a resume on the same layout. Prints a Markdown table, and the
conversion time estimated for a larger config from the measured rate.

    python bench/reshard.py                                  # 2-core CPU: ~2 minutes
    python bench/reshard.py --estimate configs/blt_1b.yaml   # the estimate's config (the default)

Static 4-byte patches (no entropy model needed) and dense hash-table gradients, as ZeRO requires.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blt.config import load_config  # noqa: E402
from blt.net import free_port  # noqa: E402
from blt.train.plan import count_params  # noqa: E402

COMMON = [
    "patching.mode=static",
    "model.hash_sparse_grad=false",
    "eval.every=0",
    "eval.max_bytes=4096",
    "logging.images=false",
    "logging.samples=0",
    "logging.progress=false",
    "training.max_minutes=null",
]


def blt(args: list[str], procs: int = 1) -> tuple[float, str]:
    """Run `blt ARGS` (under torchrun with `procs` > 1); (wall seconds, stderr)."""
    cmd = [sys.executable, "-m", "blt", *args]
    threads = max(1, (os.cpu_count() or 1) // procs)
    if procs > 1:
        cmd[:3] = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(procs),
            "--master-port",
            str(free_port()),
            "-m",
            "blt",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"`blt {' '.join(args[:2])}` failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stderr


def train(run: Path, procs: int, steps: int, *extra: str) -> tuple[float, str]:
    batch = 8 // procs
    return blt(
        [
            "train",
            str(ROOT / "configs" / "tiny.yaml"),
            f"run_dir={run}",
            *COMMON,
            f"training.steps={steps}",
            f"training.batch_size={batch}",
            f"checkpoint.every={steps}",
            *extra,
        ],
        procs,
    )


def state_bytes(config: str) -> int:
    """fp32 weights + two Adam moments of every parameter: what the conversion reads and writes."""
    return 12 * count_params(load_config(config))[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="steps before the checkpoint")
    ap.add_argument("--estimate", default=str(ROOT / "configs" / "blt_1b.yaml"))
    ap.add_argument("--out", default="bench_runs/reshard", help="where the runs go (replaced)")
    args = ap.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    source = out / "zero2"
    train(source, 2, args.steps, "distributed.zero_stage=2")
    step_dir = sorted((source / "checkpoints").glob("step_*"))[-1]

    wall, err = blt(["consolidate", str(step_dir), "--universal"])
    convert = float(re.search(r"universal checkpoint in ([\d.]+) s", err).group(1))
    tiny = state_bytes(str(ROOT / "configs" / "tiny.yaml"))
    resumed = f"checkpoint.resume={step_dir}"
    rows = [
        (
            "same layout (2 processes, ZeRO-2)",
            *train(out / "same", 2, args.steps + 1, resumed, "distributed.zero_stage=2"),
        ),
        ("1 process (local engine)", *train(out / "one", 1, args.steps + 1, resumed)),
        ("2 processes, ZeRO-3", *train(out / "zero3", 2, args.steps + 1, resumed, "distributed.zero_stage=3")),
    ]

    print("| what | seconds |\n|---|---|")
    print(
        f"| conversion of the ZeRO-2 checkpoint ({tiny / 1e6:,.0f} MB of fp32 weights + Adam moments) | "
        f"{convert:.1f} ({wall:.1f} for the whole `blt consolidate --universal`) |"
    )
    for name, seconds, _ in rows:
        print(f"| resume + 1 step + save on {name}, end to end | {seconds:.1f} |")
    big = state_bytes(args.estimate)
    print(
        f"\nrate {tiny / convert / 1e6:,.0f} MB/s; {Path(args.estimate).name}: {big / 1e9:,.1f} GB of state, "
        f"estimated {big / (tiny / convert):,.0f} s to convert at that rate"
    )


if __name__ == "__main__":
    main()
