"""training.compile against eager: bytes/s of configs/tiny.yaml once compiled, and the compile time
paid at the start. Runs alternate eager and compiled (--rounds each), one process at a time, and
the table reports medians.

    python bench/compile.py                     # 2-core CPU: ~6 minutes
    python bench/compile.py --steps 60 --rounds 3

Static 4-byte patches (no entropy model needed). The step time is the median over the steps after
the first --warmup (which include compiling), from metrics.jsonl; "first step" includes
compiling the training graphs (validation compiles once more at the end, not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "patching.mode=static",
    "eval.every=0",
    "eval.max_bytes=4096",
    "logging.images=false",
    "logging.samples=0",
    "logging.progress=false",
    "logging.every=1",
    "training.max_minutes=null",
    "checkpoint.every=100000",
]


def run(run_dir: Path, steps: int, compiled: bool) -> list[dict]:
    """Train; the metrics of each step. Each run compiles into an empty inductor cache (cold, as on
    a new machine; a warm cache makes the first step much shorter)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "blt",
        "train",
        str(ROOT / "configs" / "tiny.yaml"),
        f"run_dir={run_dir}",
        *COMMON,
        f"training.steps={steps}",
        f"training.compile={str(compiled).lower()}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor_cache")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{run_dir.name} failed:\n{out.stderr[-3000:]}")
    return [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench_runs/compile")
    args = ap.parse_args()
    out = ROOT / args.out
    results = {c: {"step": [], "rate": [], "start": []} for c in (False, True)}
    for r in range(args.rounds):
        for compiled in (False, True):
            metrics = run(out / f"{'compiled' if compiled else 'eager'}_{r}", args.steps, compiled)
            later = [m for m in metrics if m["step"] > args.warmup]
            results[compiled]["step"].append(statistics.median(m["step_time_s"] for m in later))
            results[compiled]["rate"].append(statistics.median(m["bytes_per_s"] for m in later))
            results[compiled]["start"].append(metrics[0]["step_time_s"])
    print("| training.compile | step (ms) | bytes/s | first step (s) |\n|---|---|---|---|")
    med = {c: {k: statistics.median(v) for k, v in results[c].items()} for c in results}
    for compiled in (False, True):
        m = med[compiled]
        print(f"| {str(compiled).lower()} | {1000 * m['step']:.0f} | {m['rate']:,.0f} | {m['start']:.1f} |")
    print(
        f"\ncompiled / eager bytes/s: {med[False]['step'] / med[True]['step']:.2f}x; compiling costs "
        f"{med[True]['start'] - med[False]['start']:.1f} s once (medians of {args.rounds} alternated runs each)"
    )


if __name__ == "__main__":
    main()
