"""Core benchmark: the default tiny BLT against the byte-level Transformer baseline on this
machine: same data, same steps and bytes (so about the same time). Prints a Markdown table.

    python bench/core.py                      # the README numbers
    python bench/core.py --minutes 2          # quicker look: each run stops after 2 minutes

Trains configs/entropy_tiny.yaml first (its time is reported separately), then configs/tiny.yaml
and configs/byte_baseline_tiny.yaml (training.max_minutes=MINUTES is the guard), into bench_runs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blt.config import Config, load_config  # noqa: E402
from blt.train.loop import train  # noqa: E402


def run(config: str, run_dir: Path, overrides: list[str]) -> tuple[dict, float, dict, list[dict], Config]:
    """Train configs/CONFIG into run_dir -> (last validation, wall seconds, model_info.json,
    metrics.jsonl records, the config)."""
    cfg = load_config(ROOT / "configs" / config, [f"run_dir={run_dir}", "checkpoint.resume=none", *overrides])
    t0 = time.time()
    result = train(cfg)
    wall = time.time() - t0
    info = json.loads((run_dir / "model_info.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, wall, info, metrics, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock cap per model")
    ap.add_argument("--out", default="bench_runs", help="where the runs go (replaced)")
    args = ap.parse_args()
    out = ROOT / args.out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    budget = [f"training.max_minutes={args.minutes}", "logging.progress=false"]

    _, ent_wall, _, _, _ = run("entropy_tiny.yaml", out / "entropy_tiny", ["logging.progress=false"])
    rows = []
    for name, config, extra in (
        ("BLT tiny (entropy patches)", "tiny.yaml", [f"patching.entropy_model={out / 'entropy_tiny'}"]),
        ("byte Transformer baseline", "byte_baseline_tiny.yaml", []),
    ):
        result, wall, info, metrics, _ = run(config, out / Path(config).stem, budget + extra)
        train_lines = [m for m in metrics if "bytes_per_s" in m]
        bps = sum(m["bytes_per_s"] for m in train_lines[1:]) / max(1, len(train_lines) - 1)
        rows.append((name, result, wall, info, bps))

    print(f"\nentropy model (configs/entropy_tiny.yaml): trained in {ent_wall:.0f} s\n")
    print(
        "| model | params | steps | wall time (s) | val BPB | train bytes/s | mean patch (bytes) "
        "| FLOPs/byte (train) | global / local FLOPs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, result, wall, info, bps in rows:
        print(
            f"| {name} | {info['params']:,} | {result['step']} | {wall:.0f} | {result['bpb']:.3f} | {bps:,.0f} "
            f"| {result['avg_patch_size']:.2f} | {info['flops_per_byte']:.3g} "
            f"| {info['global_share']:.0%} / {info['local_share']:.0%} |"
        )


if __name__ == "__main__":
    main()
