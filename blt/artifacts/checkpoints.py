"""Finding and reading checkpoints: the step dirs a run writes (blt/train/checkpoint.py writes
them), read without the trainer and without unpickling code.

    run_dir/checkpoints/step_00000100/   model.safetensors (or ZeRO shards), state.json, config.yaml, ...
    run_dir/checkpoints/latest           the name of the newest complete step dir

A checkpoint is complete when its directory is no longer named .tmp and holds state.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from blt.artifacts.files import fit_weights, read_safetensors
from blt.artifacts.zero import consolidate_zero, is_zero_checkpoint
from blt.config import Config, ConfigError, load_config
from blt.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be found or does not fit; one-line message."""


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


def read_state_json(step_dir: Path) -> dict:
    """A checkpoint's state.json, or a one-line CheckpointError if it is not a JSON object."""
    path = Path(step_dir) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"'{path}' is unreadable or not JSON ({type(e).__name__}); "
            "use another checkpoint (the previous one in checkpoints/ is still complete)"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("step", 0), int):
        raise CheckpointError(f"'{path}' is not a blt checkpoint state (a JSON object with an integer step)")
    return state


def checkpoint_config(step_dir: Path) -> Config:
    """The config.yaml saved beside a checkpoint's (or an export's) weights."""
    try:
        return load_config(Path(step_dir) / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint '{step_dir}' has an unusable config.yaml: {e}") from None


def load_weights(model: nn.Module, step_dir: Path) -> None:
    """Weights from model.safetensors, or consolidated from a ZeRO checkpoint's shards (read with
    weights_only, never unpickling code); a file that does not fit is named in one line."""
    step_dir = Path(step_dir)
    if (step_dir / "model.safetensors").is_file():
        fit_weights(model, read_safetensors(step_dir / "model.safetensors"), step_dir)
    elif is_zero_checkpoint(step_dir):
        fit_weights(model, consolidate_zero(step_dir), step_dir)
    else:
        raise CheckpointError(f"checkpoint '{step_dir}' has neither model.safetensors nor ZeRO shards")
