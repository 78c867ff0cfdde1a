"""Writing checkpoints, and reading back the training state a resume needs: one directory per
step, written to a temporary name and renamed when complete, then pointed to by
`checkpoints/latest`; so a crash mid-save leaves the previous one loadable. Finding checkpoints and
loading their weights is blt/artifacts/checkpoints.py.

    run_dir/checkpoints/step_00000100/
        model.safetensors   weights (safetensors: never unpickled)
        optimizer.pt        optimizer state (loaded with weights_only=True)
        state.json          step, data-loader state, patching threshold, engine, counters
        rng.pt              torch RNG states
        config.yaml         the resolved config that built the model
    run_dir/checkpoints/universal/step_00000100/   its universal form, made when a resume changes layout
Distributed runs write the same directory with DeepSpeed's shards in it (deepspeed_engine.py).
A checkpoint is complete when its directory is no longer named .tmp and holds state.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from blt.artifacts.checkpoints import CheckpointError, read_state_json
from blt.artifacts.files import load_pt
from blt.config import Config, dump_config
from blt.disk import write_safetensors

UNIVERSAL = "universal"  # checkpoints/universal/<step dir name>/: universal forms (blt/train/reshard.py)


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


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer, state: dict, cfg: Config, prune: bool = True
) -> Path:
    tmp, final = start_checkpoint(run_dir, step)
    write_safetensors(tmp / "model.safetensors", model)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step, engine="local", world_size=1), indent=1))
    return finish_checkpoint(tmp, final, cfg, prune)


def finish_checkpoint(tmp: Path, final: Path, cfg: Config, prune: bool = True) -> Path:
    """Add the config, rename the complete `tmp` dir to `final`, then move `latest`, then prune
    (prune=False: a save after a failure keeps every older checkpoint, which may be the one to go
    back to)."""
    dump_config(cfg, tmp / "config.yaml")
    shutil.rmtree(final.parent / UNIVERSAL / final.name, ignore_errors=True)  # made from an earlier save of this step
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    ckpts = final.parent
    latest_tmp = ckpts / "latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpts / "latest")
    if prune:
        _prune(ckpts, cfg.checkpoint.keep_last, final)
    return final


def _prune(ckpts: Path, keep_last: int, just_saved: Path) -> None:
    """Keep the newest keep_last checkpoints, and always the one just saved (a run resumed from an
    earlier checkpoint can leave newer-numbered ones of the abandoned steps behind)."""
    steps = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep_last]:
        if old != just_saved:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob("step_*.tmp"):  # left by a save that crashed; never the one just finished
        shutil.rmtree(stale, ignore_errors=True)
    for form in (ckpts / UNIVERSAL).glob("step_*"):  # the universal forms of pruned checkpoints
        if not (ckpts / form.name.removesuffix(".tmp")).is_dir():
            shutil.rmtree(form, ignore_errors=True)


def load_training_state(step_dir: Path, optimizer) -> dict:
    """state.json, optimizer.pt and rng.pt of a single-process checkpoint (other layouts go through
    blt/train/reshard.py)."""
    step_dir = Path(step_dir)
    state = read_state_json(step_dir)
    if optimizer is not None and (step_dir / "optimizer.pt").is_file():
        saved = load_pt(step_dir / "optimizer.pt")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(
                f"'{step_dir / 'optimizer.pt'}' does not fit this optimizer ({first}); "
                "resume with the config it was written with"
            ) from None
    rng = load_pt(step_dir / "rng.pt")
    try:
        set_rng_state(rng)
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"'{step_dir / 'rng.pt'}' holds no torch RNG state ({type(e).__name__}); use another checkpoint"
        ) from None
    return state
