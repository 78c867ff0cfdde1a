"""The run directory of a `blt train` start, checked before anything is written, and whether a
checkpoint fits the config it is resumed with.

    rundir = prepare_run_dir(cfg)    # RunDirError (one line) if the directory must not be trained into
    rundir.create()                  # when the run is about to write its first file
    rundir.discard()                 # after a start that completed no step: take back what it wrote

A run trains into a new or empty directory, or continues the checkpoints of the run in it. It
never writes into an export, a directory of other files, or a run that stopped before its first
checkpoint (delete that one to start again: its steps left no weights), and never starts afresh
over a run's checkpoints.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from blt.artifacts.checkpoints import CheckpointError, checkpoint_config, find_checkpoint, has_checkpoints
from blt.artifacts.exports import is_export
from blt.config import Config, ConfigError, config_to_dict
from blt.disk import make_dirs
from blt.errors import UserError


class RunDirError(UserError):
    """The run directory cannot be used as asked; one-line message."""


RUN_MARKERS = ("checkpoints", "metrics.jsonl", "model_info.json")  # what only a blt run writes


@dataclass
class RunDir:
    """The run directory of one start, checked before anything is written. `create` makes it when
    the run is about to write; `discard` takes back what a start that completed no step wrote."""

    path: Path
    resume_from: Path | None  # the checkpoint to continue from; None = a fresh start
    fresh: bool  # absent or empty before this start: all it will hold is this start's
    existed: bool
    made: list[Path] = field(default_factory=list)  # directories create() made, outermost first

    def create(self) -> None:
        try:
            self.made = make_dirs(self.path)
        except OSError as e:
            raise RunDirError(f"run directory '{self.path}' is not writable ({e.strerror}); set run_dir=PATH") from None

    def discard(self) -> None:
        """Remove what this start wrote into a fresh directory that still holds no checkpoint."""
        if not self.fresh or not self.path.is_dir() or has_checkpoints(self.path):
            return
        if self.made:
            shutil.rmtree(self.made[0], ignore_errors=True)
        elif self.existed:  # it was empty: everything in it is this start's
            for entry in self.path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def prepare_run_dir(cfg: Config) -> RunDir:
    """Check run_dir and checkpoint.resume before anything is written (nothing is created here).
    A run trains into a new or empty directory (a fresh start), or continues the checkpoints of
    the run in it; it never writes into an export, a directory of other files, or a run that
    stopped before its first checkpoint, and never starts afresh over a run's checkpoints."""
    run_dir = cfg.resolved_run_dir
    resume = cfg.checkpoint.resume
    source = None if resume in ("auto", "none") else resume_source(resume)
    check_writable(run_dir)
    existed = run_dir.is_dir()
    entries = sorted(e.name for e in run_dir.iterdir()) if existed else []
    if not entries:
        return RunDir(run_dir, find_checkpoint(source) if source else None, fresh=True, existed=existed)
    if is_export(run_dir):
        raise RunDirError(
            f"run directory '{run_dir}' is an export (it holds export.json), not a run; train into a "
            f"new run_dir=PATH (to fine-tune the export: training.init_from={run_dir}); "
            "nothing was written"
        )
    if not has_checkpoints(run_dir):
        ours = [m for m in RUN_MARKERS if (run_dir / m).exists()]
        if ours:
            raise RunDirError(
                f"run directory '{run_dir}' holds a run that stopped before its first checkpoint "
                f"({', '.join(ours)}); delete it to start again, or pick a new run_dir=PATH "
                "(nothing was overwritten)"
            )
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise RunDirError(
            f"run directory '{run_dir}' is not empty ({shown}) and holds no blt run; pick a new or "
            "empty run_dir=PATH (nothing was written)"
        )
    if resume == "none":
        raise RunDirError(
            f"run directory '{run_dir}' already holds checkpoints; continue it with checkpoint.resume=auto "
            "or pick a new run_dir=PATH (nothing was overwritten)"
        )
    if source is not None and not source.resolve().is_relative_to(run_dir.resolve()):
        raise RunDirError(
            f"run directory '{run_dir}' already holds another run; resume '{resume}' into a new "
            "run_dir=PATH, or continue this run with checkpoint.resume=auto (nothing was overwritten)"
        )
    return RunDir(run_dir, find_checkpoint(source or run_dir), fresh=False, existed=True)


def resume_source(value: str) -> Path:
    """checkpoint.resume=PATH -> the path; one line if it names nothing or an export."""
    path = Path(os.path.expanduser(value))
    if not path.exists():
        if "/" in value or value.startswith(("~", ".")):
            raise ConfigError(
                f"checkpoint.resume: '{value}' does not exist (checkpoint.resume must be auto | none | "
                "PATH of a run or checkpoint directory)"
            )
        raise ConfigError(f"checkpoint.resume must be auto | none | PATH, got '{value}'")
    if is_export(path):
        raise ConfigError(
            f"checkpoint.resume: '{value}' is an export (weights only, no optimizer or data "
            f"position); start from its weights with training.init_from={value}"
        )
    return path


def check_writable(run_dir: Path) -> None:
    """The run dir, or the nearest existing directory above it, accepts new files (checked without
    writing anything)."""
    p = run_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise RunDirError(f"run directory '{run_dir}' is not writable ('{p}' is not a directory); set run_dir=PATH")
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory '{run_dir}' is not writable (no write permission on '{p}'); set run_dir=PATH")


def config_diff(a: dict, b: dict, prefix: str) -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) for every leaf where two config dicts differ."""
    out: list[tuple[str, object, object]] = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key, "unset"), b.get(key, "unset")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}.{key}")
        elif va != vb:
            out.append((f"{prefix}.{key}", va, vb))
    return out


def describe_diff(diff: list[tuple[str, object, object]], a_name: str, b_name: str, limit: int = 6) -> str:
    """'model.global_model.layers: 4 in the checkpoint, 2 in the config, ...' (the first `limit`)."""

    def show(v) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{key}: {show(x)} in {a_name}, {show(y)} in {b_name}" for key, x, y in diff[:limit]]
    if len(diff) > limit:
        parts.append(f"and {len(diff) - limit} more")
    return ", ".join(parts)


def model_diff(saved: Config, cfg: Config) -> list[tuple[str, object, object]]:
    """The model keys where two configs differ, except hash_sparse_grad (how gradients are stored,
    not what the weights are)."""
    diff = config_diff(config_to_dict(saved.model), config_to_dict(cfg.model), "model")
    return [d for d in diff if d[0] != "model.hash_sparse_grad"]


def check_resumable(cfg: Config, step_dir: Path) -> None:
    """The model config must be the one the checkpoint was trained with."""
    diff = model_diff(checkpoint_config(step_dir), cfg)
    if diff:
        raise CheckpointError(
            f"checkpoint '{step_dir}' was trained with another model config "
            f"({describe_diff(diff, 'the checkpoint', 'the config')}); use its model config or a new run_dir"
        )
