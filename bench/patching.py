"""Patching modes side by side: learned, entropy, static and space patching of the tiny BLT at the
same training FLOPs and the same target mean patch size (4 bytes), on several corpora. Prints a
Markdown table: held-out BPB, training bytes/s, measured mean patch size, total training FLOPs.

    python bench/patching.py                              # bundled Shakespeare + the corpora below
    python bench/patching.py --steps 150 --corpus shakespeare   # a quicker look, one corpus
    python bench/patching.py --corpus docs='/path/*.md' --corpus code='/path/**/*.py'

A corpus is a glob of files, one document per file, split 90/10 by document (data.val_fraction);
`shakespeare` is the bundled corpus with its own held-out plays. The default corpora are text this
project does not ship that a Python machine already has: the package descriptions of the installed
distributions (`*.dist-info/METADATA` of this interpreter's site-packages, blt's own left out) and
the standard library's top-level modules (`<stdlib>/*.py`).

The FLOP budget is the learned run's: `--steps` x batch x seq_len bytes at the FLOPs per byte of a
4-byte mean patch (blt.model.flops). Every other mode gets the steps that spend the same total:
- static (4 bytes) and space patching: their FLOPs per byte at the mean patch size measured on the
  training data (space patching cannot be set to 4 bytes; its own mean is used and reported);
- entropy patching pays first for training its entropy model (configs/entropy_tiny.yaml, its
  training FLOPs) and for the entropy model's forward on every training byte, so it trains fewer
  BLT steps. Its wall time includes training the entropy model and computing the entropy cache.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import statistics
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core  # noqa: E402  (bench/core.py: this script's folder is on sys.path)

from blt.config import load_config  # noqa: E402
from blt.model.flops import flops_report, stack_flops  # noqa: E402
from blt.tokens import VOCAB_SIZE  # noqa: E402
from blt.train.metrics import mean_patch_size  # noqa: E402

MODES = ("learned", "entropy", "static", "space")


def default_corpora() -> dict[str, str]:
    """name -> glob of the corpora this machine has (see the module docstring)."""
    site = Path(sysconfig.get_paths()["purelib"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = {"shakespeare": ""}
    if any(not p.parent.name.startswith("blt-") for p in site.glob("*.dist-info/METADATA")):
        out["package-docs"] = str(site / "*.dist-info" / "METADATA")
    if list(stdlib.glob("*.py")):
        out["python-stdlib"] = str(stdlib / "*.py")
    return out


def data_overrides(pattern: str) -> list[str]:
    """The data keys of a corpus glob (none: the bundled corpus), blt's own files left out."""
    if not pattern:
        return []
    files = sorted(f for f in glob.glob(pattern) if "/blt-" not in f)
    return [f"data.train={json.dumps(files)}", "data.val_fraction=0.1", "data.sample_by=document"]


def run(config: str, run_dir: Path, overrides: list[str]) -> dict:
    """bench/core.py's run, without the progress bar or the time cap, summed up for the table."""
    result, wall, _, metrics, cfg = core.run(
        config, run_dir, ["logging.progress=false", "training.max_minutes=null", *overrides]
    )
    lines = [m for m in metrics if "bytes_per_s" in m]
    return {
        "cfg": cfg,
        "result": result,
        "wall": wall,
        "lines": lines,
        "bytes_per_s": statistics.median(m["bytes_per_s"] for m in lines[1:] or lines),
        "patch_size": mean_patch_size(lines),
    }


def space_patch_size(overrides: list[str], seq_len: int) -> float:
    """Mean patch size of space patching on a sample of the corpus's training windows."""
    import torch

    from blt.patching import patch_starts
    from blt.train.build import build_data
    from blt.train.distributed import Dist

    cfg = load_config(ROOT / "configs" / "tiny_learned.yaml", ["patching.mode=space", *overrides])
    _, loader, _ = build_data(cfg, Dist())
    x = loader.sample(64, 1)[:, :-1]
    return float(x.numel() / patch_starts(torch.as_tensor(x), cfg.patching).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=450, help="the learned run's steps; sets the FLOP budget")
    ap.add_argument(
        "--corpus",
        action="append",
        default=[],
        help="NAME=GLOB (one document per file), or a default name; repeat for several",
    )
    ap.add_argument("--modes", default=",".join(MODES), help="which modes, comma-separated")
    ap.add_argument("--out", default="bench_runs/patching", help="where the runs go (replaced)")
    args = ap.parse_args()
    known = default_corpora()
    corpora = {}
    for c in args.corpus or list(known):
        name, _, pattern = c.partition("=")
        corpora[name] = pattern if pattern else known.get(name, None)
        if corpora[name] is None:
            names = ", ".join(known)
            raise SystemExit(f"bench/patching.py: unknown corpus '{name}' (give NAME=GLOB or one of: {names})")
    modes = [m for m in args.modes.split(",") if m]
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)

    base = load_config(ROOT / "configs" / "tiny_learned.yaml")
    step_bytes = base.training.batch_size * base.data.seq_len
    params = 0  # FLOPs per byte do not depend on the parameter count

    def fpb(patching, size: float) -> float:
        return flops_report(base.model, base.data.seq_len, size, params, patching=patching).flops_per_byte

    budget = fpb(base.patching, 4.0) * args.steps * step_bytes
    print(f"FLOP budget per run: {budget:.3e} ({args.steps} learned steps of {step_bytes} bytes)", flush=True)
    rows = []
    for name, pattern in corpora.items():
        data = data_overrides(pattern)
        for mode in modes:
            run_dir = out / name / mode
            over = [*data, f"patching.mode={mode}"]
            extra_flops, ent_wall = 0.0, 0.0
            if mode == "learned":
                steps = args.steps
            elif mode == "static":
                over += ["patching.patch_size=4"]
                steps = round(budget / (fpb(_patching(base, "static"), 4.0) * step_bytes))
            elif mode == "space":
                size = space_patch_size(data, base.data.seq_len)
                steps = round(budget / (fpb(_patching(base, "space"), size) * step_bytes))
            else:  # entropy: its entropy model first, trained on the same corpus
                ent = run("entropy_tiny.yaml", out / name / "entropy_model", data)
                ecfg = ent["cfg"]
                ent_train = flops_report(ecfg.model, ecfg.data.seq_len, 1.0, 0).flops_per_byte
                extra_flops = ent_train * ecfg.training.steps * ecfg.training.batch_size * ecfg.data.seq_len
                ent_fwd = stack_flops(ecfg.model.lm, base.data.seq_len) + 2 * ecfg.model.lm.dim * VOCAB_SIZE
                per_step = (fpb(_patching(base, "entropy"), 4.0) + ent_fwd) * step_bytes
                steps = max(1, round((budget - extra_flops) / per_step))  # at least one, on a tiny budget
                extra_flops += ent_fwd * steps * step_bytes
                ent_wall = ent["wall"]
                over += [
                    f"patching.entropy_model={out / name / 'entropy_model'}",
                    "patching.target_patch_size=4.0",
                    "patching.threshold_mode=global",
                ]
            print(f"{name} / {mode}: {steps} steps", flush=True)
            r = run(
                "tiny_learned.yaml",
                run_dir,
                [*over, f"training.steps={steps}", "eval.every=0", f"schedule.warmup_steps={min(50, steps // 8)}"],
            )
            total = fpb(r["cfg"].patching, r["patch_size"]) * steps * step_bytes + extra_flops
            rows.append((name, mode, steps, r, total, ent_wall))
            print(
                json.dumps(
                    {
                        "corpus": name,
                        "mode": mode,
                        "steps": steps,
                        "val_bpb": r["result"].get("bpb"),
                        "bytes_per_s": r["bytes_per_s"],
                        "patch_size": r["patch_size"],
                        "flops": total,
                        "wall_s": r["wall"] + ent_wall,
                    }
                ),
                flush=True,
            )

    print(
        "\n| corpus | patching | BLT steps | held-out BPB | train bytes/s | mean patch (bytes) "
        "| total train FLOPs | wall time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, mode, steps, r, total, ent_wall in rows:
        wall = f"{r['wall'] + ent_wall:.0f}" + (f" (entropy model {ent_wall:.0f})" if ent_wall else "")
        print(
            f"| {name} | {mode} | {steps} | {r['result']['bpb']:.3f} | {r['bytes_per_s']:,.0f} | "
            f"{r['patch_size']:.2f} | {total:.3e} | {wall} |"
        )


def _patching(base, mode: str):
    from dataclasses import replace

    return replace(base.patching, mode=mode)


if __name__ == "__main__":
    main()
