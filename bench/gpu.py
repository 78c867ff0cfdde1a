"""GPU readiness in one command: every GPU path of the trainer checked and timed, one table printed
and one JSON file written. Each part runs in its own process under a time limit, so a part that
fails or hangs prints its one-line cause and the rest still run.

    python bench/gpu.py                       # one H100/H200: about 8 minutes; --budget-min caps it
    python bench/gpu.py --dry-run             # the same parts on CPU at toy sizes (CI runs this)
    python bench/gpu.py --parts correctness generation --out bench_runs/gpu

Parts:
- correctness: a small BLT in bf16 on the device against the fp32 CPU reference (the dense
  attention backend), for every patching mode (static, space, entropy with a random entropy model)
  and every sparse attention backend (flex, gather, dense; a `local` pattern in every Transformer):
  the loss within LOSS_TOL relative and all gradients together within GRAD_TOL relative L2 error.
- train: bytes/s, TFLOP/s, MFU and peak memory against `blt plan`'s estimate, for
  configs/blt_1b.yaml (4.5B parameters with its hash tables: about 90 GB to train on one GPU, so an
  80 GB H100 skips it, saying so) and a smaller shape of it (global model 1024 x 24; bf16, static
  4-byte patches, the bundled text), each a real `blt train` stopped after --steps steps: the local
  models' 512-byte window as plain windowed SDPA, as a FlexAttention `local` pattern and as a
  gather one; with and without training.compile; with and without activation checkpointing. Runs
  go in that order of importance until the part's time is spent.
- zero2: one `blt train` step of DeepSpeed ZeRO-2 in one process, over nccl (gloo on CPU).
- generation: cached generation bytes/s of the 1B preset (random weights, bf16, static patches),
  batch 1 and 8, eager and compiled (`Generator(..., compile=True)`), with the compile time and
  whether both gave the same greedy bytes (in bf16 fused kernels round differently, so greedy
  choices between near-equal logits may differ: reported, not failed; the fp32 dry run must match).

Dry run: tiny shapes, fp32 CPU as the "device" (bf16 autocast on CPU for correctness), a few
steps; FlexAttention cannot train on CPU, so its rows say so there instead of running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSS_TOL = 2e-2  # relative: bf16 autocast against fp32
GRAD_TOL = 0.1  # relative L2 error of all gradients together
PARTS = ("correctness", "zero2", "train", "generation")  # the order they run in
# seconds per part on a GPU, 480 in all (the dry run's parts get three times these); a part's rows
# are kept as they finish, so one cut short still reports what it measured
LIMITS = {"correctness": 75, "zero2": 45, "train": 250, "generation": 110}
# seconds a training run needs to be worth starting (start-up, compiling, --steps steps)
RUN_NEEDS = {"1B": 100, "0.5B": 60, "toy": 15}

TEXT = ROOT / "blt" / "data" / "shakespeare" / "train" / "hamlet.txt"
QUIET = [
    "eval.every=0",
    "eval.max_bytes=65536",
    "logging.every=1",
    "logging.progress=false",
    "logging.images=false",
    "logging.samples=0",
    "logging.tensorboard=false",
    "checkpoint.every=100000",
    "training.max_minutes=null",
    "patching.mode=static",
    "patching.patch_size=4",
    "patching.max_patch_length=null",
]
TOY = [
    "model.encoder.dim=32",
    "model.encoder.heads=2",
    "model.encoder.window=32",
    "model.decoder.dim=32",
    "model.decoder.heads=2",
    "model.decoder.window=32",
    "model.decoder.layers=1",
    "model.global_model.dim=48",
    "model.global_model.heads=2",
    "model.global_model.layers=2",
    "model.cross_attn_heads=2",
    "model.hash_buckets=512",
    "data.seq_len=128",
    "training.batch_size=2",
    "training.device=cpu",
]
# global model 1024 x 24 (300M), local models 512 wide: ~340M parameters without the hash tables
# (150M more in them)
M300 = [
    "model.global_model.dim=1024",
    "model.global_model.layers=24",
    "model.encoder.dim=512",
    "model.encoder.heads=8",
    "model.decoder.dim=512",
    "model.decoder.heads=8",
    "model.cross_attn_heads=8",
    "model.hash_buckets=50000",
]


def local_pattern(backend: str, dry: bool) -> list[str]:
    """The local models' window as a sparse `local` pattern run by `backend`."""
    window, block = (32, 16) if dry else (512, 128)
    return [
        f"model.{m}.{k}={v}"
        for m in ("encoder", "decoder")
        for k, v in (
            ("window", "null"),
            ("sparse.pattern", "local"),
            ("sparse.window", window),
            ("sparse.block", block),
            ("sparse.backend", backend),
        )
    ]


# ---------------------------------------------------------------------------------------- parts


def part_correctness(dry: bool, device: str, emit) -> None:
    import torch

    from blt.config import config_from_dict
    from blt.model import build_model
    from blt.tokens import OFFSET

    T, B = (128, 2) if dry else (1024, 2)
    raw = TEXT.read_bytes()[: B * (T + 1)]
    ids = torch.tensor([b + OFFSET for b in raw]).view(B, T + 1)
    tokens, targets = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(0)
    elm = build_model(
        config_from_dict({"model": {"arch": "byte_lm", "lm": {"dim": 64, "layers": 2, "heads": 2}}}).model
    ).eval()
    for mode in ("static", "space", "entropy"):
        for backend in ("flex", "gather", "dense"):
            case = f"{mode} patching, {backend} attention"
            if backend == "flex" and device == "cpu":
                emit({"case": case, "ok": None, "result": "skipped: FlexAttention has no CPU backward"})
                continue
            try:
                emit({"case": case, **_compare(mode, backend, device, tokens, targets, elm)})
            except Exception as e:  # one case's failure is its row, the others still run
                emit({"case": case, "ok": False, "result": f"failed: {one_line(e)}"})


def _compare(mode, backend, device, tokens, targets, elm) -> dict:
    """One case: the loss and gradients of the model in bf16 on `device` with `backend` against
    fp32 on the CPU with the dense backend, on the same patches."""
    import torch

    from blt.config import config_from_dict
    from blt.model import build_model
    from blt.patching import Patcher
    from blt.train.loop import lm_loss

    def model_cfg(be):
        sparse = {"pattern": "local", "window": 32, "block": 16, "backend": be}
        return {
            "encoder": {"dim": 64, "layers": 1, "heads": 2, "window": None, "sparse": sparse},
            "global_model": {"dim": 128, "layers": 2, "heads": 2, "sparse": {**sparse, "window": 16}},
            "decoder": {"dim": 64, "layers": 2, "heads": 2, "window": None, "sparse": sparse},
            "cross_attn_k": 2,
            "cross_attn_heads": 2,
            "hash_ngram_sizes": [3, 4],
            "hash_buckets": 256,
        }

    patching = {
        "mode": mode,
        "patch_size": 4,
        "target_patch_size": 4.0,
        "max_patch_length": 8,
        "entropy_model": "random",
    }
    cfg0 = config_from_dict({"model": model_cfg("dense"), "patching": patching})
    patcher = Patcher(cfg0.patching, elm if mode == "entropy" else None)
    with torch.no_grad():
        patcher.calibrate(tokens)
        pids = patcher(tokens)  # the same patches on both sides: the comparison is of the model
    results = []
    for where, be, dtype in (("cpu", "dense", None), (device, backend, torch.bfloat16)):
        cfg = config_from_dict({"model": model_cfg(be), "patching": patching})
        torch.manual_seed(1)
        model = build_model(cfg.model, cfg.patching).to(where)
        x, y = tokens.to(where), targets.to(where)
        with torch.autocast(torch.device(where).type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = lm_loss(model(x, pids.to(where)), y)
        loss.backward()
        grads = torch.cat([p.grad.detach().float().flatten().cpu() for p in model.parameters() if p.grad is not None])
        results.append((float(loss), grads))
    (ref_loss, ref_g), (loss, g) = results
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    grad_err = float((g - ref_g).norm() / ref_g.norm())
    ok = loss_err <= LOSS_TOL and grad_err <= GRAD_TOL
    return {
        "ok": ok,
        "loss_rel_err": loss_err,
        "grad_rel_err": grad_err,
        "result": f"loss {loss:.4f} vs {ref_loss:.4f} (rel {loss_err:.1e}), gradients rel L2 {grad_err:.1e}",
    }


def train_runs(dry: bool) -> list[tuple[str, list[str]]]:
    """(case, overrides) of the training part, most important first (a short budget keeps the first)."""
    if dry:
        base = [*TOY, "training.steps=1000", "training.dtype=fp32"]
        return [
            ("toy: windowed SDPA", base),
            ("toy: flex local pattern", [*base, *local_pattern("flex", True)]),
            ("toy: gather local pattern", [*base, *local_pattern("gather", True)]),
            ("toy: compiled", [*base, "training.compile=true"]),
            ("toy: activation checkpointing", [*base, "training.activation_checkpointing=true"]),
        ]
    base = ["training.steps=1000", "training.dtype=bf16", "training.device=cuda"]
    return [
        ("1B: windowed SDPA", base),
        ("1B: compiled", [*base, "training.compile=true"]),
        ("1B: flex local pattern", [*base, *local_pattern("flex", False)]),
        ("1B: gather local pattern", [*base, *local_pattern("gather", False)]),
        ("1B: activation checkpointing", [*base, "training.activation_checkpointing=true"]),
        ("0.5B: windowed SDPA", [*base, *M300]),
        ("0.5B: compiled", [*base, *M300, "training.compile=true"]),
    ]


def part_train(dry: bool, device: str, steps: int, deadline: float, out: Path, emit) -> None:
    from blt.config import load_config
    from blt.train.plan import make_plan

    gpu_gb = 0.0
    if device == "cuda":
        import torch

        gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    for case, overrides in train_runs(dry):
        left = deadline - time.time()
        if left < RUN_NEEDS[case.split(":")[0]]:
            emit({"case": case, "ok": None, "result": f"skipped: {max(0, left):.0f} s of the part's time left"})
            continue
        if "flex" in case and device == "cpu":
            emit({"case": case, "ok": None, "result": "skipped: FlexAttention has no CPU backward"})
            continue
        run = out / case.replace(":", "").replace(" ", "_")
        overrides = [
            *QUIET,
            *overrides,
            f"run_dir={run}",
            f"data.train=[{TEXT}]",
            f"data.val=[{TEXT}]",
            f"data.cache_dir={out / 'data_cache'}",
        ]
        try:
            cfg = load_config(ROOT / "configs" / "blt_1b.yaml", overrides)
            plan = make_plan(cfg, 1, 1, gpu=device != "cpu")
            estimate = plan["stages"][0].total / 1e9
            if gpu_gb and estimate > 0.95 * gpu_gb:
                emit(
                    {
                        "case": case,
                        "ok": None,
                        "plan_gb": estimate,
                        "result": f"skipped: blt plan estimates {estimate:.0f} GB, this GPU has {gpu_gb:.0f} GB",
                    }
                )
                continue
            metrics = train_until(overrides, steps, left - 5, run)
        except Exception as e:
            emit({"case": case, "ok": False, "result": f"failed: {one_line(e)}"})
            continue
        later = metrics[min(len(metrics) - 1, max(1, steps // 3)) :]  # after compiling and warm-up
        med = {k: statistics.median([m[k] for m in later]) for k in ("bytes_per_s", "tflops", "mfu", "step_time_s")}
        peak = max(m.get("peak_mem_gb", 0.0) for m in metrics)
        emit(
            {
                "case": case,
                "ok": True,
                **med,
                "peak_mem_gb": peak,
                "plan_gb": estimate,
                "steps": len(metrics),
                "first_step_s": metrics[0]["step_time_s"],
                "params": plan["params"],
                "result": f"{med['bytes_per_s']:,.0f} B/s, {med['tflops']:.1f} TFLOP/s, "
                f"MFU {100 * med['mfu']:.1f}%, step {1000 * med['step_time_s']:.0f} ms "
                f"(first {metrics[0]['step_time_s']:.1f} s), peak {peak:.2f} GB (plan {estimate:.2f} GB)",
            }
        )


def train_until(overrides: list[str], steps: int, limit: float, run: Path) -> list[dict]:
    """`blt train` until `steps` steps have metrics, then killed (no final checkpoint: the 1B's is
    tens of GB); returns those steps' metrics."""
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: no resume, no earlier metrics
    cmd = [sys.executable, "-m", "blt", "train", str(ROOT / "configs" / "blt_1b.yaml"), *overrides]
    log = run.parent / f"{run.name}.log"
    with open(log, "w") as f:
        # in this part's process group: the driver's kill of the part reaches it too
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
    t0, metrics = time.monotonic(), []
    try:
        while time.monotonic() - t0 < limit:
            metrics = read_metrics(run / "metrics.jsonl")
            if len(metrics) >= steps or proc.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    metrics = read_metrics(run / "metrics.jsonl")[:steps]
    if len(metrics) < steps:
        why = (
            f"exited with code {proc.returncode}: {last_line(log.read_text(errors='replace'))}"
            if proc.returncode not in (None, -9)
            else f"stopped after {limit:.0f} s"
        )
        raise RuntimeError(f"{len(metrics)} of {steps} steps: {why}")
    return metrics


def part_zero2(dry: bool, device: str, out: Path, limit: float, emit) -> None:
    from blt.net import free_port

    run = out / "zero2"
    shutil.rmtree(run, ignore_errors=True)
    backend = "gloo" if device == "cpu" else "nccl"
    sizes = [*TOY, "training.dtype=fp32"] if dry else [*TOY, "training.dtype=bf16", "training.device=cuda"]
    overrides = [
        *QUIET,
        *sizes,
        "training.steps=2",
        "distributed.engine=deepspeed",
        "distributed.zero_stage=2",
        f"distributed.backend={backend}",
        f"run_dir={run}",
        f"data.train=[{TEXT}]",
        f"data.val=[{TEXT}]",
        f"data.cache_dir={out / 'data_cache'}",
        "eval.max_bytes=4096",
    ]
    cmd = [sys.executable, "-m", "blt", "train", str(ROOT / "configs" / "blt_1b.yaml"), *overrides]
    env = {
        **child_env(),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
    case = f"ZeRO-2, 1 process, {backend}"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        return emit({"case": case, "ok": False, "result": f"failed: no result in {limit:.0f} s"})
    state_file = run / "checkpoints" / "step_00000002" / "state.json"
    if done.returncode != 0 or not state_file.exists():
        return emit({"case": case, "ok": False, "result": f"failed: {last_line(done.stderr or done.stdout)}"})
    metrics = read_metrics(run / "metrics.jsonl")
    state = json.loads(state_file.read_text())
    layout = (state.get("engine"), state.get("zero_stage"), state.get("world_size"))
    emit(
        {
            "case": case,
            "ok": len(metrics) == 2 and layout == ("deepspeed", 2, 1),
            "loss": [m["loss"] for m in metrics],
            "result": f"{len(metrics)} steps, losses "
            + ", ".join(f"{m['loss']:.3f}" for m in metrics)
            + f"; checkpoint of {layout[0]} ZeRO-{layout[1]}, {layout[2]} process",
        }
    )


def part_generation(dry: bool, device: str, emit) -> None:
    import torch

    from blt.config import PatchingConfig, load_config
    from blt.generation import Generator
    from blt.model import build_model
    from blt.patching import Patcher

    cfg = load_config(
        ROOT / "configs" / ("tiny.yaml" if dry else "blt_1b.yaml"),
        ["data.seq_len=4096"] if not dry else ["data.seq_len=256"],
    )
    dtype = torch.float32 if dry else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: the 1B preset is 4.5B parameters
        model = build_model(cfg.model, cfg.patching).to(dtype=dtype).eval()
    patcher = Patcher(PatchingConfig(mode="static", patch_size=4, max_patch_length=None))
    n = 32 if dry else 256
    eager, compiled = Generator(model, patcher, cfg.data.seq_len), None
    try:
        compiled = Generator(model, patcher, cfg.data.seq_len, compile=True)
    except Exception as e:
        emit({"case": "compiled generation", "ok": False, "result": f"failed: {one_line(e)}"})
    for batch in (1, 8):
        prompts, reference = [f"ROMEO {i}." for i in range(batch)], None  # eager's greedy bytes
        for name, gen in (("eager", eager), ("compiled", compiled)):
            if gen is None:
                continue
            case = f"generation, batch {batch}, {name}"
            try:
                t = time.perf_counter()
                first = gen.generate(prompts, max_bytes=8, temperature=0)  # compiles the steps
                first_s = time.perf_counter() - t
                outs = gen.generate(prompts, max_bytes=n, temperature=0)
                stats = dict(gen.stats)
                if name == "eager":
                    reference = outs
                elif reference is None:  # the eager case failed: its bytes, once more
                    reference = eager.generate(prompts, max_bytes=n, temperature=0)
                differ = first_difference(outs, reference)
                note = "" if differ is None else f"; greedy bytes differ from eager's from byte {differ}"
                emit(
                    {
                        "case": case,
                        "ok": len(first) == batch and (differ is None or dtype != torch.float32),
                        "bytes_per_s": stats["bytes_per_s"],
                        "first_call_s": first_s,
                        "differs_at": differ,
                        "compiled_steps": stats["compiled_steps"],
                        "result": f"{stats['bytes_per_s']:,.0f} B/s in all, first call {first_s:.1f} s{note}",
                    }
                )
            except Exception as e:
                emit({"case": case, "ok": False, "result": f"failed: {one_line(e)}"})


def first_difference(a: list[bytes], b: list[bytes]) -> int | None:
    """The first byte position where any row of a and b differ; None if all are equal."""
    at = [
        next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        for ra, rb in zip(a, b)
        if ra != rb
    ]
    return min(at) if at else None


# ---------------------------------------------------------------------------------------- driver


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "loss" in m and "bytes_per_s" in m:
            out.append(m)
    return out


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def child(args) -> None:
    """One part, in this process; each row is appended to args.rows (JSON lines) as it is made, so
    the driver keeps it even if this part is killed later."""
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible: run on a GPU, or pass --dry-run")

    def emit(row: dict) -> None:
        with open(args.rows, "a") as f:
            f.write(json.dumps(row) + "\n")

    out, left = Path(args.out), args.deadline - time.time()
    if args.child == "correctness":
        part_correctness(args.dry_run, device, emit)
    elif args.child == "train":
        part_train(args.dry_run, device, args.steps, args.deadline - 5, out, emit)
    elif args.child == "zero2":
        part_zero2(args.dry_run, device, out, left - 5, emit)
    else:
        part_generation(args.dry_run, device, emit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script itself")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 20; dry run 4)")
    ap.add_argument("--out", default="bench_runs/gpu", help="run dirs, logs and gpu.json go here")
    ap.add_argument("--budget-min", type=float, default=8.0, help="skip what would not start within this")
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)  # time.time() to finish by
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.dry_run else 20)
    if args.child:
        return child(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start, report = time.monotonic(), {"dry_run": args.dry_run, "parts": {}}
    for part in args.parts:
        left = args.budget_min * 60 - (time.monotonic() - t_start)
        limit = min(LIMITS[part] * (3 if args.dry_run else 1), left)
        if limit < 15:
            report["parts"][part] = [{"case": part, "ok": None, "result": "skipped: --budget-min was spent"}]
            continue
        rows_file = Path(tempfile.mkstemp(prefix=f"{part}_", suffix=".jsonl", dir=out)[1])
        cmd = [
            sys.executable,
            __file__,
            "--child",
            part,
            "--rows",
            str(rows_file),
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--deadline",
            str(time.time() + limit),
        ] + (["--dry-run"] if args.dry_run else [])
        t = time.monotonic()
        # its own process group (with the `blt train` runs it starts): killed together
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), start_new_session=True
        )
        try:
            log, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        except KeyboardInterrupt:  # Ctrl-C: the part's processes go too; the parts so far are kept
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        (out / f"{part}.log").write_text(log or "")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        rows_file.unlink()
        if proc.returncode != 0:  # killed or crashed: what it finished stays, and the cause is a row
            why = f"killed after {limit:.0f} s" if proc.returncode in (-9, 137) else last_line(log or "")
            rows.append({"case": f"{part} (the rest)", "ok": False, "result": f"failed: {why}"})
        for r in rows:
            r["part"] = part
        report["parts"][part] = rows
        report.setdefault("seconds", {})[part] = round(time.monotonic() - t, 1)
        save(report, out, args.dry_run, t_start)  # after every part: a later crash keeps these
    save(report, out, args.dry_run, t_start)
    print(f"\n{report['device']}; {report['total_s']:.0f} s; {out / 'gpu.json'}\n")
    print("| part | case | ok | result |\n|---|---|---|---|")
    for part, rows in report["parts"].items():
        for r in rows:
            ok = {True: "yes", False: "**no**", None: "-"}[r["ok"]]
            print(f"| {part} | {r['case']} | {ok} | {r['result']} |")
    failed = [r for rows in report["parts"].values() for r in rows if r["ok"] is False]
    sys.exit(1 if failed else 0)


def save(report: dict, out: Path, dry: bool, t_start: float) -> None:
    report["device"] = device_name(dry)
    report["total_s"] = round(time.monotonic() - t_start, 1)
    (out / "gpu.json").write_text(json.dumps(report, indent=1))


def device_name(dry: bool) -> str:
    """Without importing torch here: the driver holds no CUDA context while the parts run."""
    from importlib.metadata import version

    torch_version = f"torch {version('torch')}"
    if dry:
        return f"dry run: CPU, {torch_version}"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        gpu = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "a GPU"
    except (OSError, subprocess.TimeoutExpired):
        gpu = "a GPU (nvidia-smi not found)"
    return f"{gpu}, {torch_version}"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:  # the driver itself: print where, since no part row can say it
        traceback.print_exc()
        sys.exit(2)
