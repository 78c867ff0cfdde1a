"""Facts about a torch device: is it on this machine, autocast on it, its peak memory so far.
Where training runs and in what dtype is decided in blt/train/device.py.

    device = check_device("cuda:1", "--device")   # OptionError naming the fix if this machine has no cuda:1
    with autocast_ctx(device, torch.bfloat16): ...  # dtype None or float32: autocast off
    peak_memory_gb(torch.device("cpu"))             # the process's peak resident set, in GB
"""

from __future__ import annotations

import torch

from blt.typed import OptionError


def check_device(device: str, name: str = "device") -> str:
    """`device` (cpu, cuda, cuda:N, mps, or auto = cuda when visible) checked against this machine
    and this torch build; returns the device to use. `name` is how the caller spells the option
    (device, --device); an OptionError names the fix. The --device check of every inference verb."""
    fix = f"{name} cpu" if name.startswith("-") else f"{name}='cpu'"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"{name} {device!r} is not a device: use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible"
        )
        raise OptionError(f"{name} {device}: {why}; use {fix}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(
            f"{name} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{name} {device}: no MPS device is visible; use {fix}")
    return device


def autocast_ctx(device: torch.device | str, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s kind; None or float32 turns autocast off."""
    dev = torch.device(device)
    if dtype is None or dtype == torch.float32:
        return torch.autocast(dev.type, enabled=False)
    return torch.autocast(dev.type, dtype=dtype)


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory so far: GPU memory allocated by torch, or CPU resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KB
