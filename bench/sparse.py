"""Sparse attention benchmark: forward+backward time and extra peak memory against sequence length,
for every pattern (gather backend on CPU, FlexAttention on GPU) and for dense causal SDPA. Prints a
Markdown table.

    python bench/sparse.py                          # CPU: B=1, H=8, head dim 64, fp32, 1k..16k
    python bench/sparse.py --lengths 1024 8192      # fewer lengths
    python bench/sparse.py --device cuda --dtype bf16   # GPU: flex vs SDPA (FlashAttention) dense

Each (pattern, length) runs in a fresh process, so the peak-memory column (resident set on CPU,
torch's allocator on GPU, above what the inputs took) belongs to that case alone. Time is the
minimum of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PATTERNS = {  # DeepSpeed-style settings at block 64
    "local (window 256)": dict(pattern="local", block=64, window=256),
    "strided (dilation 2, 4 blocks)": dict(pattern="strided", block=64, dilation=2, num_sliding_window_blocks=4),
    "fixed (8 local, 1 global)": dict(pattern="fixed", block=64, num_local_blocks=8, num_global_blocks=1),
    "bigbird (3 window, 1 global, 2 random)": dict(
        pattern="bigbird", block=64, num_sliding_window_blocks=3, num_global_blocks=1, num_random_blocks=2
    ),
    "longformer (3 window, globals 0 and 7)": dict(
        pattern="longformer", block=64, num_sliding_window_blocks=3, global_block_indices=[0, 7]
    ),
    "variable (4-block windows, global 0, 1 random)": dict(
        pattern="variable", block=64, local_window_blocks=[4], global_block_indices=[0], num_random_blocks=1
    ),
}

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
from blt.config import SparseAttentionConfig
from blt.model.sparse_attention import sparse_attention
from blt.model.sparse_patterns import Pattern
spec, T, device, dtype, repeats = json.loads({args!r})
dev = torch.device(device)
dt = {{"fp32": torch.float32, "bf16": torch.bfloat16}}[dtype]
q, k, v = (torch.randn(1, 8, T, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
g = torch.randn(1, 8, T, 64, device=dev, dtype=dt)
if spec is None:
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
else:
    p = Pattern(SparseAttentionConfig(**spec), 8)
    fn = lambda: sparse_attention(q, k, v, p)
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()
def mem():
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
fn().backward(g); sync()
q.grad = k.grad = v.grad = None
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
base = mem() if dev.type == "cuda" else 0
best = float("inf")
for _ in range(repeats):
    t0 = time.perf_counter(); fn().backward(g); sync(); best = min(best, time.perf_counter() - t0)
    q.grad = k.grad = v.grad = None
print(json.dumps({{"ms": 1000 * best, "mem": mem() - base}}))
"""


def run_case(spec, T: int, device: str, dtype: str, repeats: int) -> dict:
    code = CHILD.format(root=str(ROOT), args=json.dumps([spec, T, device, dtype, repeats]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"ms": float("nan"), "mem": float("nan"), "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cases = {"dense causal SDPA": None, **PATTERNS}
    if args.device == "cuda":  # the GPU goal: window 512 at 16k
        cases["local (window 512)"] = dict(pattern="local", block=128, window=512)
    results = {
        name: [run_case(spec, T, args.device, args.dtype, args.repeats) for T in args.lengths]
        for name, spec in cases.items()
    }
    backend = "FlexAttention" if args.device == "cuda" else "gather"
    print(
        f"\nforward+backward, B=1, H=8, head dim 64, {args.dtype}, {args.device}; patterns use the {backend} "
        "backend; ms (peak extra memory MB)\n"
    )
    print(
        "| pattern | "
        + " | ".join(f"{T // 1024}k" for T in args.lengths)
        + " | time 8k / 1k | speed-up vs dense at 8k |"
    )
    print("|---|" + "---|" * (len(args.lengths) + 2))
    L = args.lengths
    for name, rows in results.items():
        cells = [f"{r['ms']:.0f} ({r['mem'] / 1e6:.0f})" for r in rows]
        ratio = speed = ""
        if 1024 in L and 8192 in L:
            ratio = f"{rows[L.index(8192)]['ms'] / rows[L.index(1024)]['ms']:.1f}"
            speed = f"{results['dense causal SDPA'][L.index(8192)]['ms'] / rows[L.index(8192)]['ms']:.1f}x"
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {speed} |")
    for name, rows in results.items():
        for T, r in zip(L, rows):
            if "error" in r:
                print(f"{name} at {T}: {r['error']}")


if __name__ == "__main__":
    main()
