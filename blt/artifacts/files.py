"""Reading weight files safely: `.pt` files without ever running code from them, safetensors
files with one-line errors, and weights checked against the model before they are loaded.

What blt writes itself is safetensors and JSON. The `.pt` files in a checkpoint (the local
engine's optimizer.pt and rng.pt, DeepSpeed's model and optimizer shards) are pickles, and a
pickle can name any callable: a shared or downloaded checkpoint could run code on the machine
that loads it. So every `.pt` load, ours and the ones inside DeepSpeed (which passes
`weights_only=False` itself), runs under `weights_only_loads()`: torch's restricted unpickler
(tensors, containers, numbers, strings) plus an explicit allow-list of plain data classes, forced
on through TORCH_FORCE_WEIGHTS_ONLY_LOAD, which overrides a library's own `weights_only=False`.
A file that needs anything else is refused with one line naming it; nothing of it is executed.

    with weights_only_loads(extra_allowed):   # around any library call that may torch.load
        engine.load_checkpoint(...)
    state = load_pt(path)                     # our own .pt files
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from blt.errors import UserError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # would contradict FORCE; unset while loading


class UnsafeFileError(UserError):
    """A file that cannot be read without unpickling code, or is not a readable torch file."""


@contextlib.contextmanager
def weights_only_loads(allowed: list | tuple = ()) -> Iterator[None]:
    """Every torch.load inside is weights_only (even where the caller passes weights_only=False),
    with `allowed` classes added to torch's allow-list."""
    saved = {k: os.environ.get(k) for k in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"
    os.environ.pop(FORCE_NOT, None)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def refusal(path: Path, err: BaseException) -> UnsafeFileError:
    """The one-line error for a .pt file that could not be read under weights_only_loads()."""
    if isinstance(err, pickle.UnpicklingError):
        detail = str(err).strip().splitlines()
        what = next((ln.strip() for ln in detail if "GLOBAL" in ln or "Unsupported" in ln), "")
        what = what.split("Please")[0].strip().rstrip(".")[:160]
        return UnsafeFileError(
            f"'{path}' holds pickled objects other than tensors and plain data ({what or 'not allow-listed'}); "
            "it was not loaded (blt never runs code from a checkpoint; use a checkpoint written by blt)"
        )
    return UnsafeFileError(
        f"'{path}' is truncated or not a torch file ({type(err).__name__}); it was not loaded "
        "(use another checkpoint, or re-save this one)"
    )


LOAD_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    OSError,
    KeyError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
)


def load_pt(path: str | Path, allowed: list | tuple = ()) -> object:
    """torch.load of one file onto the CPU, weights_only, or a one-line UnsafeFileError."""
    path = Path(path)
    try:
        with weights_only_loads(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        raise refusal(path, e) from None


def first_unreadable(paths: list[Path], allowed: list | tuple = ()) -> UnsafeFileError | None:
    """The refusal for the first of `paths` that load_pt cannot read (after a library's load failed
    under weights_only_loads(), to name the file); None if all of them read."""
    for p in paths:
        try:
            load_pt(p, allowed)
        except UnsafeFileError as e:
            return e
    return None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, or a one-line UnsafeFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UnsafeFileError(
            f"'{path}' is not a readable safetensors file ({first}); it was not loaded "
            "(the file is truncated or of another format: use another checkpoint or export)"
        ) from None


class WeightsMismatchError(UserError):
    """Weights whose names or shapes do not fit the model built from the config."""


def fit_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Load `state` into `model` strictly, or say in one line which names and shapes differ.
    A name missing from `state` is fine when the model ties it to a name that is there (a
    safetensors file stores tied weights once)."""
    own = model.state_dict()
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the weights, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    loaded_ptrs = {own[k].data_ptr() for k in own if k in state}
    missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded_ptrs]
    unexpected = sorted(set(state) - set(own))
    problems = (
        shapes[:3]
        + ([f"missing {_few(missing)}"] if missing else [])
        + ([f"unexpected {_few(unexpected)}"] if unexpected else [])
    )
    if problems:
        raise WeightsMismatchError(
            f"the weights in '{where}' do not fit the model of its config: "
            + "; ".join(problems)
            + " (use the config the weights were trained with)"
        )
    model.load_state_dict(state, strict=False)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
