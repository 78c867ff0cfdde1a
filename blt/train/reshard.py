"""Resuming a checkpoint on another layout: another number of processes, another ZeRO stage, one
process with the local engine instead of DeepSpeed, or back.

A checkpoint records its layout in state.json (engine, ZeRO stage, processes). On the same layout
each engine reads its own files. On another, the checkpoint is first turned into a DeepSpeed
*universal checkpoint*, which does not depend on how many processes wrote it: per parameter, the
full fp32 weight, its Adam moments and the optimizer's step count.

    checkpoints/universal/step_00000100/zero/<parameter name>/{fp32,exp_avg,exp_avg_sq,step}.pt
                                       /zero/optimizer_state.pt, mp_rank_00_model_states.pt, blt.json

ZeRO-1/2/3 shards are converted by DeepSpeed's own `ds_to_universal`; a single-process (or ZeRO-0)
checkpoint already holds whole tensors, which are written out in the same layout. DeepSpeed engines
then load it with DeepSpeed's `checkpoint.load_universal`; the local engine reads the parameter
files itself. The conversion runs once per checkpoint (rank 0; the others wait), into
`step_00000100.tmp`, renamed when complete: a conversion that is killed leaves the checkpoint as it
was, and the next resume starts it again. It holds `checkpoints/.step_00000100.universal.lock`
meanwhile, so a second process converting the same checkpoint waits, then uses the first one's.
Every file is checked (present, plain tensors, the model's shapes) before the marker is written,
and again before a universal form is used: a damaged one is converted again. Pruning a checkpoint
removes its universal form.

    saved = Layout.of_state(state)                       # how the checkpoint was written
    if saved != engine.layout:
        udir = universal_checkpoint(step_dir)            # cached beside the checkpoint
        load_universal(model, optimizer, udir)           # the local engine (DeepSpeed: load_checkpoint)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from blt.artifacts.checkpoints import CheckpointError, checkpoint_config, read_state_json
from blt.artifacts.files import LOAD_ERRORS, load_pt, read_safetensors, weights_only_loads
from blt.artifacts.zero import checkpoint_classes, import_deepspeed, safe_shards, zero_to_universal
from blt.disk import file_lock
from blt.errors import UserError
from blt.model import build_model
from blt.train.checkpoint import UNIVERSAL
from blt.train.optim import Optimizers, build_optimizer

MARKER, FORMAT = "blt.json", 1  # written last: what this version of the conversion made
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Layout:
    """How a checkpoint was written, or how a job trains: what its optimizer files depend on."""

    engine: str  # "local" or "deepspeed" (accelerate runs DeepSpeed: "deepspeed")
    zero_stage: int | None  # None for the local engine
    world_size: int

    @classmethod
    def of_state(cls, state: dict) -> Layout:
        engine = state.get("engine", "local")
        return cls(engine, state.get("zero_stage") if engine != "local" else None, int(state.get("world_size", 1)))

    def __str__(self) -> str:
        stage = f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else ""
        return f"{self.engine}{stage} with {self.world_size} process{'es' if self.world_size > 1 else ''}"


def checkpoint_layout(step_dir: Path) -> Layout:
    return Layout.of_state(read_state_json(step_dir))


def universal_dir(step_dir: Path) -> Path:
    """Where the universal form of a checkpoint goes: beside the step dirs, never inside one
    (DeepSpeed's converter reads every file under the step dir it converts)."""
    return step_dir.parent / UNIVERSAL / step_dir.name


def universal_checkpoint(step_dir: Path, log=None) -> Path:
    """The universal form of the checkpoint in `step_dir`, made now if it is not there yet or is
    damaged (it is derived from the checkpoint, which is never changed). Processes converting one
    checkpoint at once (two `blt consolidate --universal`, two jobs resuming it) take turns: the
    first converts, the others wait for it and then use its conversion."""
    step_dir = Path(step_dir)
    out = universal_dir(step_dir)
    if _made_here(out, step_dir) and _damage(out, step_dir) is None:
        return out
    try:  # the lock file is removed when done; kill -9 leaves it, and the next conversion takes it
        with file_lock(step_dir.parent / f".{out.name}.universal.lock", remove=True):
            return _convert_once(step_dir, out, log)
    except PermissionError as e:
        raise _unwritable(step_dir, e) from None


def _convert_once(step_dir: Path, out: Path, log) -> Path:
    """universal_checkpoint's work, under its lock: into `step_00000100.tmp` (what a killed conversion
    left there is redone), every file checked, then the marker, then renamed to `out`."""
    if _made_here(out, step_dir):
        damage = _damage(out, step_dir)
        if damage is None:
            return out  # another process made it while this one waited
        if log is not None:
            log(f"the universal form '{out}' is damaged ({damage}); converting {step_dir.name} again")
    elif out.exists() and not (out / MARKER).is_file():
        raise CheckpointError(
            f"'{out}' holds files blt did not write (no {MARKER}); move it away, then run again "
            f"(blt writes the universal form of '{step_dir.name}' there)"
        )
    layout = checkpoint_layout(step_dir)
    tmp = out.with_name(out.name + ".tmp")
    start = time.perf_counter()
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed conversion left
        tmp.parent.mkdir(exist_ok=True)
        if layout.engine == "deepspeed" and layout.zero_stage in (1, 2, 3):
            zero_to_universal(step_dir, tmp)
        else:
            _convert_whole(step_dir, tmp, layout)
        _for_every_stage(tmp, step_dir)
        damage = _damage(tmp, step_dir)
        if damage is not None:
            raise CheckpointError(
                f"converting '{step_dir}' ({layout}) to a universal checkpoint left it incomplete "
                f"({damage}); the checkpoint is unchanged: resume it as {layout}"
            )
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "from": str(layout), "source": _fingerprint(step_dir)}))
        shutil.rmtree(out, ignore_errors=True)  # one an older blt made, or a damaged one
        os.replace(tmp, out)
    except PermissionError as e:
        _discard(tmp)
        raise _unwritable(step_dir, e) from None
    except UserError:  # already one line: a shard that is unsafe or does not fit
        _discard(tmp)
        raise
    except Exception as e:  # DeepSpeed's converter asserts; every rank must hear of it as one line
        _discard(tmp)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(
            f"converting '{step_dir}' ({layout}) to a universal checkpoint failed ({first}); "
            f"the checkpoint is unchanged: resume it as {layout}"
        ) from None
    if log is not None:
        log(f"converted {step_dir.name} ({layout}) to a universal checkpoint in {time.perf_counter() - start:.1f} s")
    return out


def _unwritable(step_dir: Path, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write the universal form of '{step_dir}' beside it ({e.strerror}); copy the "
        "checkpoint somewhere writable and resume from the copy"
    )


# DeepSpeed's universal loader reads the engine's counters under the name the *loading* stage
# writes: ZeRO-1/2 engines read the first, ZeRO-3 engines the second
ENGINE_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _for_every_stage(udir: Path, step_dir: Path) -> None:
    """Make a universal checkpoint loadable by every ZeRO stage and by the local engine, whichever
    stage wrote it. DeepSpeed 0.19's two universal formats disagree: a ZeRO-3 conversion stores
    each tensor flat and bare, with no step.pt, no ds_version, and engine states under ZeRO-3's
    file name; ZeRO-1/2 store {"param": tensor of the parameter's shape} and a step.pt, and
    ZeRO-3's loader reads the step and settings from an `optimizer_state_dict` entry that ZeRO-1/2
    conversions do not write. Everything is brought to the union of both here."""
    have = [udir / n for n in ENGINE_STATES if (udir / n).is_file()]
    if not have:
        raise CheckpointError(f"the universal conversion of '{udir.parent}' wrote no engine states")
    for name in ENGINE_STATES:
        if not (udir / name).is_file():
            shutil.copyfile(have[0], udir / name)
    zero = udir / "zero"
    with weights_only_loads(checkpoint_classes()):
        sd = torch.load(zero / "optimizer_state.pt", map_location="cpu")
        step = sd.get("optimizer_state_dict", {}).get("state", {}).get(0, {}).get("step")
        if step is None:
            step = next((torch.load(p) for p in sorted(zero.glob("*/step.pt"))), torch.tensor(0.0))
        step = torch.tensor(float(step))
        shapes = _parameter_shapes(step_dir)
        first = zero / next(iter(shapes)) / "fp32.pt"
        bare = not isinstance(torch.load(first, map_location="cpu"), dict)  # one converter wrote them all
        for name, shape in shapes.items() if bare else ():
            for key in ("fp32", *MOMENTS):
                path = zero / name / f"{key}.pt"
                flat = torch.load(path, map_location="cpu")
                torch.save({"param": flat.detach().reshape(shape).clone(), "cat_dim": 0}, path)
            torch.save(step, zero / name / "step.pt")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    # ZeRO-3 keeps its flat fp32 partition states here too; the parameter files already hold them
    sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": groups}
    sd.setdefault("ds_version", import_deepspeed().__version__)
    torch.save(sd, zero / "optimizer_state.pt")


def _parameter_shapes(step_dir: Path) -> dict[str, torch.Size]:
    """name -> shape of every parameter of the checkpoint's model (built on the meta device)."""
    with torch.device("meta"):
        cfg = checkpoint_config(step_dir)
        model = build_model(cfg.model, cfg.patching)
    return {n: p.shape for n, p in model.named_parameters()}


def _discard(tmp: Path) -> None:
    """Take back a failed conversion: its files, and checkpoints/universal/ if it is left empty."""
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        tmp.parent.rmdir()


def _fingerprint(step_dir: Path) -> str:
    """What the checkpoint holds: its state.json and the names and sizes of its files (a step
    saved again, by a run resumed from an earlier one, gets a new universal form)."""
    files = sorted((p.name, p.stat().st_size) for p in step_dir.iterdir() if p.is_file())
    digest = hashlib.sha256((step_dir / "state.json").read_bytes())
    digest.update(json.dumps(files).encode())
    return digest.hexdigest()


def _made_here(udir: Path, step_dir: Path) -> bool:
    """A complete universal form, made by this version of the conversion from this checkpoint."""
    try:
        marker = json.loads((udir / MARKER).read_text())
        return marker.get("format") == FORMAT and marker.get("source") == _fingerprint(step_dir)
    except (OSError, ValueError, AttributeError):
        return False


def _damage(udir: Path, step_dir: Path) -> str | None:
    """What is wrong with the files of a universal form: one missing, unreadable as plain tensors,
    or of another shape than the checkpoint's model gives its parameter; None if nothing. The files
    are memory-mapped, so only their headers are read."""
    zero = udir / "zero"
    files = [(udir / n, None) for n in ENGINE_STATES] + [(zero / "optimizer_state.pt", None)]
    for name, shape in _parameter_shapes(step_dir).items():
        files += [(zero / name / f"{key}.pt", shape) for key in ("fp32", *MOMENTS)] + [(zero / name / "step.pt", ())]
    with weights_only_loads(checkpoint_classes()):
        for path, shape in files:
            where = path.relative_to(udir)
            if not path.is_file():
                return f"{where} is missing"
            try:
                obj = torch.load(path, map_location="cpu", mmap=True)
            except pickle.UnpicklingError:
                return f"{where} holds objects other than tensors and plain data (it was not loaded)"
            except LOAD_ERRORS as e:
                return f"{where} is truncated or not a torch file ({type(e).__name__})"
            if shape == ():
                got = tuple(obj.shape) if torch.is_tensor(obj) else type(obj).__name__
                if got not in ((), (1,)):
                    return f"{where} holds {got}, not a step count"
            elif shape is not None:
                t = obj.get("param") if isinstance(obj, dict) else None
                if not torch.is_tensor(t) or t.shape != shape:
                    got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                    return f"{where} holds {got}, but the model's {path.parent.name} is {tuple(shape)}"
    return None


def _whole_optimizer_state(step_dir: Path, layout: Layout) -> dict:
    """The torch optimizer state_dict of a single-process or ZeRO-0 checkpoint."""
    if layout.engine == "local":
        path = step_dir / "optimizer.pt"
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint '{step_dir}' has no optimizer.pt, so it cannot be resumed "
                "on another layout (its weights load anywhere: training.init_from)"
            )
        return load_pt(path)
    with safe_shards(step_dir):
        states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu")
    opt = states.get("optimizer") if isinstance(states, dict) else None
    if not isinstance(opt, dict) or "param_groups" not in opt:
        raise CheckpointError(
            f"checkpoint '{step_dir}' ({layout}) keeps its optimizer in a form only the same "
            "layout reads (ZeRO-0 in bf16/fp16); resume it with the same engine, stage and "
            "process count"
        )
    return opt


def _named_moments(step_dir: Path, layout: Layout) -> tuple[dict[str, dict], int, list[dict]]:
    """(name -> {exp_avg, exp_avg_sq}, optimizer step, dense param-group settings) of a checkpoint
    written by one optimizer over whole tensors. The optimizer names parameters by position;
    rebuilding it (on the meta device) from the checkpoint's config gives each position its name."""
    cfg = checkpoint_config(step_dir)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.patching)
    built = build_optimizer(model, cfg.optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    saved = _whole_optimizer_state(step_dir, layout)
    parts = built.parts if isinstance(built, Optimizers) else [built]
    saved_parts = saved.get("parts", [saved]) if isinstance(saved, dict) else []
    if len(saved_parts) != len(parts):
        raise CheckpointError(f"the optimizer state in '{step_dir}' does not fit its config.yaml")
    moments, steps = {}, []
    for opt, sd in zip(parts, saved_parts):
        params = [p for g in opt.param_groups for p in g["params"]]
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        if len(ids) != len(params):
            raise CheckpointError(f"the optimizer state in '{step_dir}' does not fit its config.yaml")
        for p, i in zip(params, ids):
            st = sd["state"].get(i, {})
            if st:
                moments[names[id(p)]] = {k: st[k] for k in MOMENTS}
                steps.append(int(float(st["step"])))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in saved_parts[0]["param_groups"]]
    return moments, max(steps, default=0), groups


def _convert_whole(step_dir: Path, tmp: Path, layout: Layout) -> None:
    """A checkpoint of whole tensors (one process, or ZeRO-0) written in the universal layout."""
    weights = read_safetensors(step_dir / "model.safetensors")
    moments, step, groups = _named_moments(step_dir, layout)
    zero = tmp / "zero"
    for name, w in weights.items():
        d = zero / name
        d.mkdir(parents=True)
        torch.save({"param": w.float(), "cat_dim": 0}, d / "fp32.pt")
        for key in MOMENTS:  # a parameter the optimizer never updated has zero moments
            m = moments.get(name, {}).get(key)
            torch.save(
                {"param": (m.to_dense() if m is not None else torch.zeros_like(w)).float(), "cat_dim": 0},
                d / f"{key}.pt",
            )
        torch.save(torch.tensor(float(step)), d / "step.pt")
    cfg = checkpoint_config(step_dir)
    deepspeed = import_deepspeed()
    # what DeepSpeed's universal loader reads besides the parameter files: the group settings and
    # clipping (the loop sets the learning rate every step), and the engine's counters
    torch.save(
        {"ds_version": deepspeed.__version__, "param_groups": groups, "clip_grad": cfg.optimizer.grad_clip},
        zero / "optimizer_state.pt",
    )
    global_batch = cfg.training.batch_size * cfg.training.grad_accum * layout.world_size
    done = int(read_state_json(step_dir)["step"])
    torch.save(
        {
            "module": {},
            "buffer_names": [],
            "optimizer": None,
            "lr_scheduler": None,
            "data_sampler": None,
            "random_ltd": None,
            "sparse_tensor_module_names": [],
            "skipped_steps": 0,
            "global_steps": done,
            "global_samples": done * global_batch,
            "dp_world_size": layout.world_size,
            "mp_world_size": 1,
            "ds_version": deepspeed.__version__,
        },
        tmp / "mp_rank_00_model_states.pt",
    )


def load_universal(model: nn.Module, optimizer, udir: Path) -> int:
    """Weights, Adam moments and step counts of a universal checkpoint into a model and its torch
    optimizer (AdamW, and SparseAdam for sparse hash tables); returns the optimizer step."""
    udir = Path(udir)
    parts = optimizer.parts if isinstance(optimizer, Optimizers) else [optimizer]
    owner = {id(p): opt for opt in parts for g in opt.param_groups for p in g["params"]}
    step = 0
    with weights_only_loads():
        for name, p in model.named_parameters():
            d = udir / "zero" / name
            if not (d / "fp32.pt").is_file():
                raise CheckpointError(
                    f"the universal checkpoint '{udir}' has no parameter {name}; "
                    "resume with the model config it was trained with"
                )
            w = torch.load(d / "fp32.pt", map_location="cpu")["param"]
            if tuple(w.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"'{d / 'fp32.pt'}' is {tuple(w.shape)} but the model's {name} is "
                    f"{tuple(p.shape)}; resume with the model config it was trained with"
                )
            with torch.no_grad():
                p.copy_(w.to(p.device, p.dtype))
            step = int(float(torch.load(d / "step.pt"))) if (d / "step.pt").is_file() else 0
            opt = owner.get(id(p))
            if opt is None:
                continue
            st = {
                k: torch.load(d / f"{k}.pt", map_location="cpu")["param"].to(p.device).view_as(p).clone()
                for k in MOMENTS
            }
            sparse = isinstance(opt, torch.optim.SparseAdam)
            opt.state[p] = {"step": step if sparse else torch.tensor(float(step)), **st}
    return step


def rng_file(step_dir: Path, layout: Layout, rank: int) -> Path | None:
    """The RNG state a rank of the new layout continues with: the same rank's of the old one, where
    it had that rank (ranks beyond it keep their fresh seeds)."""
    path = step_dir / ("rng.pt" if layout.engine == "local" else f"rank_{rank}.pt")
    return path if rank < layout.world_size and path.is_file() else None


def describe_change(step_dir: Path, saved: Layout, now: Layout, cfg) -> str:
    """The line a resume on another layout logs: both layouts, and the global batch if it changed."""
    old = checkpoint_config(step_dir).training
    before = old.batch_size * old.grad_accum * saved.world_size
    after = cfg.training.batch_size * cfg.training.grad_accum * now.world_size
    batch = (
        "the same global batch"
        if before == after
        else f"the global batch changes from {before} to {after} sequences per step (the data stream continues)"
    )
    return f"resuming a checkpoint of {saved} as {now}; {batch}"
