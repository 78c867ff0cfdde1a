"""lm-eval benchmark: loglikelihood requests/s of blt's batched scoring (blt/harness/scoring.py:
context and continuation in one forward, requests sorted by length and packed into batches)
against a per-byte baseline that runs the model once per continuation byte (how Meta's BLT
wrapper scores a request), and the shared-context path (each question's context encoded once by the
cached incremental model, each choice scored from a copy of its state), on the same multiple-choice
requests; then the accuracy of the model
on blt's shipped tasks beside chance. Prints Markdown tables.

    python bench/lm_eval.py runs/tiny                            # CPU, blt_shakespeare_next_line
    python bench/lm_eval.py exports/tiny --requests 80 --repeats 5 --batch-sizes 1 16 64
    python bench/lm_eval.py runs/tiny --device cuda --no-accuracy

Both paths score the same requests (the first --requests of the task, its contexts and choices
as lm-eval builds them) and their log-likelihoods agree (the table gives the largest difference).
Each path runs --repeats times, alternating; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: this file's name would hide the lm_eval package

from blt.artifacts import load_model  # noqa: E402
from blt.harness.scoring import Scorer  # noqa: E402
from blt.tokens import BOS_ID, OFFSET  # noqa: E402

TASK_DATA = ROOT / "blt" / "harness" / "tasks" / "data"
ACCURACY_TASKS = [
    "blt_shakespeare_next_line",
    "blt_shakespeare_word_order",
    "blt_shakespeare_speaker",
    "blt_shakespeare_bpb",
    "blt_colours",
    "blt_colours_gen",
]


def requests(task: str, n: int) -> list[tuple[bytes, bytes]]:
    """The first n (context, continuation) pairs of a shipped multiple-choice task, in order."""
    rows = [json.loads(line) for line in (TASK_DATA / f"{task.removeprefix('blt_')}.jsonl").read_text().splitlines()]
    pairs = [(r["context"].encode(), c.encode()) for r in rows for c in r["choices"]]
    return pairs[:n]


@torch.no_grad()
def per_byte(model, patcher, context: int, pairs: list[tuple[bytes, bytes]]) -> list[float]:
    """The baseline: for every continuation byte, one forward of everything before it (batch 1)."""
    dev = next(model.parameters()).device
    out = []
    for ctx, cont in pairs:
        ids = [BOS_ID] + [b + OFFSET for b in ctx + cont]
        total = 0.0
        for t in range(len(ids) - len(cont), len(ids)):
            x = torch.tensor([ids[max(0, t - context) : t]], device=dev)  # (1, <= context) bytes before t
            logp = torch.log_softmax(model(x, patcher(x))[0, -1].float(), -1)
            total += float(logp[ids[t]])
        out.append(total)
    return out


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="runs/tiny", help="run, checkpoint or export dir")
    ap.add_argument("--task", default="blt_shakespeare_next_line", help="a shipped multiple-choice task")
    ap.add_argument("--requests", type=int, default=40, help="loglikelihood requests timed (4 per question)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed table")
    ap.add_argument("--limit", type=int, default=None, help="documents per task for the accuracy table")
    args = ap.parse_args()

    loaded = load_model(args.model, args.device)
    if not args.no_speed:
        speed(args, loaded)
    if not args.no_accuracy:
        accuracy(args, loaded)


def speed(args, loaded) -> None:
    model, patcher, context = loaded.model, loaded.patcher, loaded.cfg.data.seq_len
    pairs = requests(args.task, args.requests)
    nbytes = sum(len(c) + len(k) + 1 for c, k in pairs)
    shared = sum(len(c) + 1 for c, _ in pairs[::4]) + sum(len(k) for _, k in pairs)  # each context once
    cont = sum(len(k) for _, k in pairs) / len(pairs)
    print(
        f"{args.model}: context {context} bytes, {loaded.cfg.patching.mode} patching; {len(pairs)} requests of "
        f"{args.task} ({nbytes / len(pairs):.0f} bytes each, continuation {cont:.0f}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}\n"
    )
    scorers = {b: Scorer(model, patcher, context, b, share_context=False) for b in args.batch_sizes}
    scorers |= {f"shared {b}": Scorer(model, patcher, context, b) for b in args.batch_sizes}
    for s in scorers.values():  # warm-up
        s.loglikelihood(pairs[:4])
    times: dict = {b: [] for b in scorers} | {"per-byte": []}
    values: dict = {}
    for _ in range(args.repeats):
        for b, s in scorers.items():
            dt, out = timed(lambda s=s: s.loglikelihood(pairs))
            times[b].append(dt)
            values[b] = [v for v, _ in out]
        dt, values["per-byte"] = timed(lambda: per_byte(model, patcher, context, pairs))
        times["per-byte"].append(dt)
    base = statistics.median(times["per-byte"])
    print("| scoring | forwards | requests/s | speed-up vs per-byte | max abs difference (nats) |")
    print("|---|---|---|---|---|")
    print(
        f"| per byte (one forward per continuation byte, batch 1) | {sum(len(k) for _, k in pairs)} | "
        f"{len(pairs) / base:.2f} | 1.0x | |"
    )
    for b in scorers:
        med = statistics.median(times[b])
        diff = max(abs(x - y) for x, y in zip(values[b], values["per-byte"]))
        rate = len(pairs) / med
        if isinstance(b, str):  # shared context: batches of up to b questions, in one cached state each
            n = int(b.split()[1])
            print(
                f"| shared context, batch {n} questions | {-(-len(pairs[::4]) // n)} cached | {rate:.2f} | "
                f"{base / med:.1f}x | {diff:.1e} |"
            )
        else:
            print(f"| batched, batch {b} | {-(-len(pairs) // b)} | {rate:.2f} | {base / med:.1f}x | {diff:.1e} |")
    print("\nper-run seconds: " + "; ".join(f"{k}: {', '.join(f'{t:.2f}' for t in v)}" for k, v in times.items()))
    print(
        f"bytes run per request batch: {nbytes:,}; with each question's context run once: {shared:,} "
        f"({nbytes / shared:.2f}x fewer)"
    )


def accuracy(args, loaded) -> None:
    from blt.harness.lm import BltLM
    from blt.harness.run import find_tasks, flat_metrics, run_tasks

    lm = BltLM.from_model(loaded.model, loaded.patcher, loaded.cfg.data.seq_len, batch_size=max(args.batch_sizes))
    t = time.perf_counter()
    res = flat_metrics(run_tasks(lm, find_tasks(ACCURACY_TASKS), limit=args.limit))
    print(f"\n| task | metric | {args.model} | chance |  ({time.perf_counter() - t:.0f} s)")
    print("|---|---|---|---|")
    for key, value in res.items():
        task, metric = key.split("/")
        chance = "25%" if metric.startswith("acc") else "8.00 (uniform bytes)" if metric == "bits_per_byte" else ""
        shown = f"{value:.1%}" if metric.startswith(("acc", "exact")) else f"{value:.3f}"
        print(f"| {task} | {metric} | {shown} | {chance} |")


if __name__ == "__main__":
    main()
