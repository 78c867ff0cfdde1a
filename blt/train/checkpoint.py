"""Checkpoints: one directory per step, written to a temporary name and renamed when complete,
then pointed to by `checkpoints/latest`; so a crash mid-save leaves the previous one loadable.

    run_dir/checkpoints/step_00000100/
        model.safetensors   weights (safetensors: never unpickled)
        optimizer.pt        optimizer state (loaded with weights_only=True)
        state.json          step, data-loader state, patching threshold, counters
        rng.pt              torch RNG states
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


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, state: dict, cfg: Config,
                    keep_last: int) -> Path:
    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / step_dir_name(step)
    tmp = ckpts / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1))
    dump_config(cfg, tmp / "config.yaml")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = ckpts / "latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpts / "latest")
    _prune(ckpts, keep_last)
    return final


def _prune(ckpts: Path, keep_last: int) -> None:
    steps = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir, or a step dir -> the step dir to load."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint or run directory '{p}' not found")
    if (p / "model.safetensors").is_file():
        return p
    ckpts = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    latest = ckpts / "latest"
    if latest.is_file() and (ckpts / latest.read_text().strip() / "model.safetensors").is_file():
        return ckpts / latest.read_text().strip()
    steps = sorted(d for d in ckpts.glob("step_*") if (d / "model.safetensors").is_file())
    if not steps:
        raise CheckpointError(f"no checkpoint in '{p}' (train first with `blt train CONFIG`)")
    return steps[-1]


def load_weights(model: nn.Module, step_dir: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(Path(step_dir) / "model.safetensors"), strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[-1] if first else "")
        raise CheckpointError(f"checkpoint '{step_dir}' does not match the model config: {detail}") from None
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"checkpoint '{step_dir}' does not match the model config: {what}")


def load_training_state(step_dir: Path, optimizer) -> dict:
    step_dir = Path(step_dir)
    if optimizer is not None and (step_dir / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(step_dir / "optimizer.pt", weights_only=True))
    rng = torch.load(step_dir / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((step_dir / "state.json").read_text())


def checkpoint_config(step_dir: Path) -> Config:
    try:
        return load_config(Path(step_dir) / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{step_dir}' has an unusable config.yaml: {e}") from None


def load_model_from_checkpoint(path: str | Path, device: str = "cpu"):
    """Rebuild the model a checkpoint was trained with and load its weights; returns (model, cfg, step_dir)."""
    from blt.model import build_model

    step_dir = find_checkpoint(path)
    cfg = checkpoint_config(step_dir)
    model = build_model(cfg.model)
    load_weights(model, step_dir)
    return model.to(device).eval(), cfg, step_dir
