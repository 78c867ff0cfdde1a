"""Checkpoints: one directory per step, written to a temporary name and renamed when complete,
then pointed to by `checkpoints/latest`; so a crash mid-save leaves the previous one loadable.

    run_dir/checkpoints/step_00000100/
        model.safetensors   weights (safetensors: never unpickled)
        optimizer.pt        optimizer state (loaded with weights_only=True)
        state.json          step, data-loader state, patching threshold, engine, counters
        rng.pt              torch RNG states
Distributed runs write the same directory with DeepSpeed's shards in it (deepspeed_engine.py).
A checkpoint is complete when its directory is no longer named .tmp and holds state.json.
        config.yaml         the resolved config that built the model
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from blt.config import Config, ConfigError, dump_config, load_config
from blt.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be found or does not fit; one-line message."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def start_checkpoint(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(tmp, final): a fresh, empty `step_N.tmp` to write into, and the name it gets when complete."""
    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / step_dir_name(step)
    tmp = ckpts / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, final


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, state: dict, cfg: Config) -> Path:
    tmp, final = start_checkpoint(run_dir, step)
    save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step, engine="local", world_size=1), indent=1))
    return finish_checkpoint(tmp, final, cfg)


def finish_checkpoint(tmp: Path, final: Path, cfg: Config) -> Path:
    """Add the config, rename the complete `tmp` dir to `final`, then move `latest`, then prune."""
    dump_config(cfg, tmp / "config.yaml")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    ckpts = final.parent
    latest_tmp = ckpts / "latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpts / "latest")
    _prune(ckpts, cfg.checkpoint.keep_last)
    return final


def _prune(ckpts: Path, keep_last: int) -> None:
    steps = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob("step_*.tmp"):  # left by a save that crashed; never the one just finished
        shutil.rmtree(stale, ignore_errors=True)


def is_complete(step_dir: Path) -> bool:
    """A finished checkpoint: renamed from .tmp (so every rank's files are in) with its state.json."""
    return not step_dir.name.endswith(".tmp") and (step_dir / "state.json").is_file()


def has_checkpoints(run_dir: Path) -> bool:
    return any(is_complete(d) for d in (Path(run_dir) / "checkpoints").glob("step_*"))


def find_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir, or a step dir -> the newest complete step dir to load."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint or run directory '{p}' not found")
    if is_complete(p):
        return p
    ckpts = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    latest = ckpts / "latest"
    if latest.is_file() and is_complete(ckpts / latest.read_text().strip()):
        return ckpts / latest.read_text().strip()
    steps = sorted(d for d in ckpts.glob("step_*") if is_complete(d))
    if not steps:
        raise CheckpointError(f"no checkpoint in '{p}' (train first with `blt train CONFIG`)")
    return steps[-1]


def load_weights(model: nn.Module, step_dir: Path) -> None:
    """Weights from model.safetensors, or consolidated from a ZeRO checkpoint's shards."""
    step_dir = Path(step_dir)
    try:
        if (step_dir / "model.safetensors").is_file():
            missing, unexpected = load_model(model, str(step_dir / "model.safetensors"), strict=False)
        else:
            from blt.train.deepspeed_engine import consolidate_zero, is_zero_checkpoint

            if not is_zero_checkpoint(step_dir):
                raise CheckpointError(f"checkpoint '{step_dir}' has neither model.safetensors nor ZeRO shards")
            missing, unexpected = model.load_state_dict(consolidate_zero(step_dir), strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[-1] if first else "")
        raise CheckpointError(f"checkpoint '{step_dir}' does not match the model config: {detail}") from None
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"checkpoint '{step_dir}' does not match the model config: {what}")


def read_state(step_dir: Path, engine: str, world_size: int, zero_stage: int | None = None) -> dict:
    """state.json of a checkpoint that this engine can resume (same engine, ZeRO stage and process
    count: optimizer shards and data positions are per process)."""
    step_dir = Path(step_dir)
    state = json.loads((step_dir / "state.json").read_text())
    got = (state.get("engine", "local"), state.get("zero_stage"), state.get("world_size", 1))
    if got != (engine, zero_stage, world_size):
        def say(e, z, w):
            return f"engine={e}" + (f" zero_stage={z}" if z is not None else "") + f" with {w} process(es)"
        raise CheckpointError(
            f"checkpoint '{step_dir}' was written by {say(*got)} but this job is {say(engine, zero_stage, world_size)}; "
            "resume it with the same engine, stage and process count (its weights load anywhere: blt eval/generate)")
    return state


def load_training_state(step_dir: Path, optimizer) -> dict:
    step_dir = Path(step_dir)
    state = read_state(step_dir, "local", 1)
    if optimizer is not None and (step_dir / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(step_dir / "optimizer.pt", weights_only=True))
    set_rng_state(torch.load(step_dir / "rng.pt", weights_only=True))
    return state


def checkpoint_config(step_dir: Path) -> Config:
    try:
        return load_config(Path(step_dir) / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{step_dir}' has an unusable config.yaml: {e}") from None


def load_model_from_checkpoint(path: str | Path, device: str = "cpu"):
    """Rebuild the model a checkpoint (or an export dir) was trained with and load its weights;
    returns (model, cfg, step_dir)."""
    from blt.export import is_export, load_export
    from blt.model import build_model

    if is_export(path):
        return load_export(path, device)
    step_dir = find_checkpoint(path)
    cfg = checkpoint_config(step_dir)
    model = build_model(cfg.model)
    load_weights(model, step_dir)
    return model.to(device).eval(), cfg, step_dir
