"""Distributed benchmark: step time of DeepSpeed ZeRO 0/1/2/3 with N processes against one process,
at the same global batch, on this machine. Prints a Markdown table.

    python bench/distributed.py                       # 2 CPU processes x 1 thread vs 1 process x 2 threads
    python bench/distributed.py --procs 8 --gpu       # on an 8-GPU node (bf16, nccl)

Model: configs/tiny.yaml (static 4-byte patches, so no entropy model is needed; dense hash-table
gradients in every run, as ZeRO requires). Each run trains --steps steps; the step time is the
median over the steps after the first --warmup, from metrics.jsonl's wall clock.
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
sys.path.insert(0, str(ROOT))

from blt.net import free_port  # noqa: E402


def peak_mem(run_dir: Path) -> float:
    return max(json.loads(x).get("peak_mem_gb", 0) for x in (run_dir / "metrics.jsonl").read_text().splitlines())


def step_times(run_dir: Path, warmup: int) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [(m["step"], m["elapsed"]) for m in lines if "loss" in m]
    return [b[1] - a[1] for a, b in zip(elapsed, elapsed[1:]) if a[0] >= warmup]


def train(run_dir: Path, procs: int, overrides: list[str], threads: int) -> None:
    base = [sys.executable, "-m", "blt", "train", str(ROOT / "configs" / "tiny.yaml"), f"run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if procs > 1:
        base[:3] = [
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
    out = subprocess.run(base + overrides, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"run {run_dir.name} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2, help="processes of the distributed runs")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--gpu", action="store_true", help="one GPU per process (bf16); default CPU fp32")
    ap.add_argument("--out", default="bench_runs/distributed", help="where the runs go (replaced)")
    args = ap.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    cores = os.cpu_count() or 1
    device = ["training.device=cuda"] if args.gpu else ["training.device=cpu", "training.dtype=fp32"]
    common = [
        f"training.steps={args.steps}",
        "training.max_minutes=null",
        "patching.mode=static",
        "model.hash_sparse_grad=false",
        "eval.max_bytes=8192",
        "eval.every=0",
        "logging.every=1",
        "logging.progress=false",
        f"checkpoint.every={10 * args.steps}",
        *device,
    ]
    per_proc = max(1, 8 // args.procs)  # the tiny config's global batch of 8 sequences
    rows = []
    single = out / "single"
    train(single, 1, common + ["training.batch_size=8"], threads=max(1, cores) if not args.gpu else 1)
    t_single = statistics.median(step_times(single, args.warmup))
    rows.append(("1 process (local engine)", 1, t_single, peak_mem(single)))
    for stage in (0, 1, 2, 3):
        run = out / f"zero{stage}"
        train(
            run,
            args.procs,
            common
            + [f"training.batch_size={per_proc}", f"distributed.zero_stage={stage}", "distributed.engine=deepspeed"],
            threads=max(1, cores // args.procs),
        )
        rows.append((f"ZeRO-{stage}", args.procs, statistics.median(step_times(run, args.warmup)), peak_mem(run)))

    global_bytes = 8 * 512
    kind = "GPU" if args.gpu else f"CPU ({cores} cores shared)"
    print(f"\nconfigs/tiny.yaml, global batch 8 x 512 bytes, {kind}, median of steps {args.warmup + 1}-{args.steps}\n")
    mem = "peak GPU memory of rank 0 (GB)" if args.gpu else "peak RSS of rank 0 (GB)"
    print(f"| engine | processes | step time (ms) | bytes/s | relative to 1 process | {mem} |")
    print("|---|---|---|---|---|---|")
    for name, procs, t, m in rows:
        print(f"| {name} | {procs} | {1000 * t:.0f} | {global_bytes / t:,.0f} | {t / t_single:.2f}x | {m:.2f} |")


if __name__ == "__main__":
    main()
