"""The training loop: data -> patches -> model -> loss -> engine, with validation in bits per
byte, checkpoints, resume, metrics.jsonl and a progress bar.

    blt train configs/tiny.yaml training.steps=200
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blt.config import Config, ConfigError, PatchingConfig, config_to_dict, dump_config
from blt.data import ByteLoader, PAD_ID, prepare_data, read_tokens
from blt.entropy import EntropyCache, Patcher
from blt.errors import UserError
from blt.evaluate import evaluate
from blt.model import build_model
from blt.model.flops import flops_report
from blt.train.checkpoint import find_checkpoint, CheckpointError, checkpoint_config
from blt.train.engine import LocalEngine
from blt.train.metrics import MetricsLogger
from blt.train.optim import lr_at


class RunDirError(UserError):
    """The run directory cannot be used as asked; one-line message."""


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but no CUDA device is visible (use training.device=cpu)")
    dev = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = cfg.training.dtype
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, (torch.bfloat16 if dtype == "bf16" else None)


def set_threads(n: int) -> None:
    torch.set_num_threads(n if n > 0 else (os.cpu_count() or 1))


def prepare_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """Create/check the run dir; returns (run_dir, checkpoint to resume from or None).
    Never overwrites a run that has checkpoints unless resuming it."""
    run_dir = cfg.resolved_run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run directory '{run_dir}' is not writable ({e.strerror}); set run_dir=PATH") from None
    resume = cfg.checkpoint.resume
    has_ckpt = any((run_dir / "checkpoints").glob("step_*/model.safetensors"))
    if resume == "none":
        if has_ckpt:
            raise RunDirError(
                f"run directory '{run_dir}' already holds checkpoints; continue it with checkpoint.resume=auto "
                "or pick a new run_dir=PATH (nothing was overwritten)"
            )
        return run_dir, None
    if resume == "auto":
        return run_dir, (find_checkpoint(run_dir) if has_ckpt else None)
    return run_dir, find_checkpoint(resume)


def _check_resumable(cfg: Config, step_dir: Path) -> None:
    saved = checkpoint_config(step_dir)
    for section in ("model",):
        a, b = config_to_dict(getattr(saved, section)), config_to_dict(getattr(cfg, section))
        for key in a:
            if a[key] != b[key]:
                raise CheckpointError(
                    f"checkpoint '{step_dir}' was trained with {section}.{key}={a[key]!r} but the config says "
                    f"{b[key]!r}; use the same model config or a new run_dir"
                )


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over non-padding targets."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)


def build_patcher(cfg: Config, device) -> Patcher:
    if cfg.model.arch == "byte_lm":  # a byte LM is a BLT whose patches are single bytes
        return Patcher(PatchingConfig(mode="static", patch_size=1, max_patch_length=None))
    return Patcher.from_config(cfg.patching, device)


def train(cfg: Config) -> dict:
    """Train as `cfg` says; returns the last validation metrics."""
    set_threads(cfg.training.threads)
    device, amp_dtype = resolve_device(cfg)
    run_dir, resume_from = prepare_run_dir(cfg)
    if resume_from is not None:
        _check_resumable(cfg, resume_from)

    data = prepare_data(cfg.data)
    train_tokens, val_tokens = read_tokens(data.train), read_tokens(data.val)
    L, B = cfg.data.seq_len, cfg.training.batch_size
    loader = ByteLoader(train_tokens, L, B, cfg.data.seed)

    patcher = build_patcher(cfg, device)
    state: dict = {}
    if resume_from is not None:
        state = json.loads((resume_from / "state.json").read_text())
        patcher.threshold = state.get("threshold", patcher.threshold)
    elif cfg.model.arch == "blt" and cfg.patching.mode == "entropy" and patcher.threshold is None:
        sample = ByteLoader(train_tokens, L, min(16, loader.num_windows), cfg.data.seed + 1)
        th = patcher.calibrate(next(iter(sample))[:, :-1])
        print(f"entropy threshold {th:.4f} nats gives mean patch size {cfg.patching.target_patch_size} bytes")
    if cfg.model.arch == "blt" and cfg.patching.mode == "entropy":
        # the resolved config records the threshold used and where the entropy model is
        cfg.patching.threshold = patcher.threshold
        cfg.patching.entropy_model = str(Path(cfg.patching.entropy_model).resolve())
    cache = None
    if cfg.model.arch == "blt" and cfg.patching.mode == "entropy" and cfg.patching.entropy_cache:
        cache = EntropyCache.build(patcher, train_tokens, L, data.dir)

    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg.model).to(device)
    engine = LocalEngine(model, cfg, device, amp_dtype)
    start_step = 0
    if resume_from is not None:
        state = engine.load(resume_from)
        loader.load_state_dict(state["data"])
        start_step = state["step"]
        print(f"resumed from {resume_from} at step {start_step}")
    dump_config(cfg, run_dir / "config.yaml")
    info = _model_info(cfg, model, patcher, data)
    (run_dir / "model_info.json").write_text(json.dumps(info, indent=1))
    print(
        f"{cfg.model.arch}: {info['params']:,} params ({info['params_non_embedding']:,} non-embedding), "
        f"{info['flops_per_byte']:.3g} train FLOPs/byte ({info['flops_per_byte_with_entropy']:.3g} with the "
        f"entropy model), {data.train.num_tokens:,} train / {data.val.num_tokens:,} val bytes -> {run_dir}"
    )

    metrics = MetricsLogger(run_dir, cfg.training.steps, start_step, cfg.logging.progress)
    last_val: dict = state.get("last_val", {})
    t_start = time.time()
    elapsed_before = state.get("elapsed", 0.0)
    window = {"bytes": 0, "patches": 0, "loss": 0.0, "n": 0, "t": time.time()}
    step = start_step
    try:
        while step < cfg.training.steps:
            lr = lr_at(step, cfg.training.steps, cfg.optimizer.lr, cfg.schedule)
            for _ in range(cfg.training.grad_accum):
                batch = next(loader)
                inputs, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
                ent = cache.windows(loader.last_indices).to(device) if cache is not None else None
                patch_ids = patcher(inputs, ent)
                loss = lm_loss(engine.forward(inputs, patch_ids), targets)
                engine.backward(loss / cfg.training.grad_accum)
                window["loss"] += float(loss.detach())
                window["n"] += 1
                window["bytes"] += inputs.numel()
                window["patches"] += int(patch_ids[:, -1].sum()) + len(patch_ids)
            grad_norm = engine.step(lr)
            step += 1
            metrics.advance()
            if not math.isfinite(window["loss"]):
                raise FloatingPointError(f"loss became {window['loss']} at step {step}; lower optimizer.lr")
            if step % cfg.logging.every == 0 or step == cfg.training.steps:
                dt = max(time.time() - window["t"], 1e-9)
                mean = window["loss"] / window["n"]
                metrics.log({
                    "step": step, "loss": mean, "bpb": mean / math.log(2), "lr": lr, "grad_norm": grad_norm,
                    "bytes_per_s": window["bytes"] / dt, "patches_per_s": window["patches"] / dt,
                    "avg_patch_size": window["bytes"] / max(1, window["patches"]),
                    "elapsed": elapsed_before + time.time() - t_start,
                })
                window = {"bytes": 0, "patches": 0, "loss": 0.0, "n": 0, "t": time.time()}
            out_of_time = (cfg.training.max_minutes is not None
                           and elapsed_before + time.time() - t_start > 60 * cfg.training.max_minutes)
            last = step == cfg.training.steps or out_of_time
            if last or (cfg.eval.every and step % cfg.eval.every == 0):
                t_eval = time.time()
                last_val = evaluate(model, patcher, val_tokens, L, cfg.eval.batch_size, cfg.eval.max_bytes,
                                    device, amp_dtype)
                metrics.log({"step": step, **{f"val_{k}": v for k, v in last_val.items()}})
                window["t"] += time.time() - t_eval  # keep evaluation out of bytes/s
            if last or step % cfg.checkpoint.every == 0:
                engine.save(run_dir, step, {
                    "data": loader.state_dict(), "threshold": patcher.threshold, "last_val": last_val,
                    "elapsed": elapsed_before + time.time() - t_start,
                })
            if out_of_time:
                metrics.print(f"stopping at step {step}: training.max_minutes={cfg.training.max_minutes} reached")
                break
    finally:
        metrics.close()
    return {"step": step, **last_val}


def _model_info(cfg: Config, model, patcher: Patcher, data) -> dict:
    params = sum(p.numel() for p in model.parameters())
    if cfg.model.arch == "byte_lm":
        patch_size = 1.0
    elif cfg.patching.mode == "static":
        patch_size = float(cfg.patching.patch_size)
    else:
        patch_size = cfg.patching.target_patch_size if cfg.patching.mode == "entropy" else 5.0
    ecfg = patcher.model.cfg if patcher.model is not None else None
    rep = flops_report(cfg.model, cfg.data.seq_len, patch_size, params, ecfg)
    return {"arch": cfg.model.arch, "assumed_patch_size": patch_size, **rep.__dict__,
            "train_bytes": data.train.num_tokens, "val_bytes": data.val.num_tokens}
