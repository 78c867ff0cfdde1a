"""Logging overhead: the same training run with every sink on (metrics.jsonl every step, TensorBoard,
offline W&B, the patch-size histogram) against metrics.jsonl alone every 50 steps. Prints a Markdown table.

    python bench/logging_overhead.py                 # configs/tiny.yaml, 60 steps each, 2 repeats

Validation (and with it the patch picture and the samples) is left out of both: it is excluded from
the step timings by design, so it cannot show up as overhead. Step time is the median over steps
11-60 from metrics.jsonl's wall clock, so start-up (W&B's service, TensorBoard's import) is not counted.
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


def run(run_dir: Path, steps: int, overrides: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "blt",
        "train",
        str(ROOT / "configs" / "tiny.yaml"),
        f"run_dir={run_dir}",
        f"training.steps={steps}",
        "training.max_minutes=null",
        "patching.mode=static",
        "eval.every=0",
        "eval.max_bytes=4096",
        "logging.progress=false",
        "logging.images=false",
        "logging.samples=0",
        f"checkpoint.every={10 * steps}",
        *overrides,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        sys.exit(f"{run_dir.name} failed:\n{out.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["step_time_s"] for m in lines if "step_time_s" in m and m["step"] > 10)


def cost_per_log_line(out: Path, lines: int = 300) -> float:
    """Seconds one training log line costs with every sink on (jsonl, TensorBoard, W&B offline,
    the patch-size histogram), measured directly in this process."""
    import time

    sys.path.insert(0, str(ROOT))
    from blt.config import load_config
    from blt.train.metrics import MetricsLogger

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["logging.wandb.mode=offline", "logging.tensorboard=true"])
    out.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(out, lines, 0, progress=False, cfg=cfg)
    record = {
        "loss": 1.0,
        "bpb": 1.4,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "bytes_per_s": 5000.0,
        "patches_per_s": 1200.0,
        "avg_patch_size": 4.1,
        "tflops": 0.01,
        "mfu": 0.05,
        "step_time_s": 0.6,
        "time_data_s": 0.01,
        "time_fwd_bwd_s": 0.5,
        "time_optimizer_s": 0.09,
        "peak_mem_gb": 1.5,
        "elapsed": 1.0,
    }
    hist = [0, 10, 30, 80, 120, 60, 20, 8, 3, 1, 0, 0, 2]
    t0 = time.perf_counter()
    for step in range(1, lines + 1):
        logger.log({"step": step, **record})
        logger.histogram(step, "patch_size", hist)
    per_line = (time.perf_counter() - t0) / lines
    logger.close()
    return per_line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench_runs/logging")
    args = ap.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    modes = {
        "all on: every step to metrics.jsonl, TensorBoard, W&B offline, histogram": [
            "logging.every=1",
            "logging.tensorboard=true",
            "logging.wandb.mode=offline",
        ],
        "off: metrics.jsonl every 50 steps only": ["logging.every=50", "logging.tensorboard=false"],
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):  # interleaved, so drift in the machine hits both alike
        for i, (mode, extra) in enumerate(modes.items()):
            times[mode].append(run(out / f"{i}_{r}", args.steps, extra))
    on, off = (min(v) for v in times.values())
    print(f"\nconfigs/tiny.yaml, {args.steps} steps, best of {args.repeats} runs of the median step time\n")
    print("| logging | step time (ms) |")
    print("|---|---|")
    for mode, t in zip(modes, (on, off)):
        print(f"| {mode} | {1000 * t:.1f} |")
    print(f"\noverhead of all logging, end to end: {100 * (on / off - 1):+.2f}% (run-to-run noise is about as large)")
    per_line = cost_per_log_line(out / "direct")
    print(
        f"one log line with every sink on costs {1000 * per_line:.2f} ms, directly measured: "
        f"{100 * per_line / off:.2f}% of a {1000 * off:.0f} ms step when logging every step"
    )


if __name__ == "__main__":
    main()
