"""Reading DeepSpeed ZeRO checkpoints without running code from them: consolidating the shards of
a ZeRO-1/2/3 checkpoint (fp32 or bf16) into one fp32 state dict with DeepSpeed's own reader, on the
CPU and with no process group; converting them to DeepSpeed's universal checkpoint (for a resume
on another layout); and the guard under which the training engine resumes them.

DeepSpeed loads its `.pt` shards with `torch.load(weights_only=False)`; here every such load runs
under files.weights_only_loads() with the plain data classes DeepSpeed pickles allow-listed, so a
shard that holds anything else is refused, named, and never executed. deepspeed is imported only
when a ZeRO checkpoint is read.

    if is_zero_checkpoint(step_dir):
        state = consolidate_zero(step_dir)      # {name: fp32 tensor}
    zero_to_universal(step_dir, out_dir)        # DeepSpeed's universal checkpoint (blt/train/reshard.py)
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch

from blt.artifacts.files import LOAD_ERRORS, UnsafeFileError, first_unreadable, weights_only_loads


def is_zero_checkpoint(step_dir: Path) -> bool:
    return any(Path(step_dir).glob("*optim_states.pt"))


def import_deepspeed(device_type: str = "cpu"):
    """`import deepspeed`, told the accelerator on a CPU host (else it warns that it guessed)."""
    import logging

    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def checkpoint_classes() -> list[type]:
    """The plain data classes DeepSpeed pickles into its shards (loss scaler, ZeRO stage, fragment
    addresses), found in ZeRO 1-3 fp32/bf16 checkpoints: the allow-list for loading them."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_shards(step_dir: Path):
    """DeepSpeed's own loading of a checkpoint's shards inside, with every torch.load weights_only
    (DeepSpeed passes weights_only=False); a shard that cannot be read that way is named in one
    line and nothing of it runs."""
    allowed = checkpoint_classes()
    try:
        with weights_only_loads(allowed):
            yield
    except LOAD_ERRORS as e:
        bad = first_unreadable(sorted(Path(step_dir).rglob("*.pt")), allowed)  # a universal form's are in zero/
        if bad is not None:
            raise bad from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "weights_only" in first:  # torch's advice to load it unguarded is never passed on
            first = type(e).__name__
        raise UnsafeFileError(
            f"DeepSpeed could not read the shards in '{step_dir}' ({first}); "
            "they were not loaded (use another checkpoint)"
        ) from None


def consolidate_zero(step_dir: Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a ZeRO-1/2/3 checkpoint's shards (on CPU; no process group needed)."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step_dir = Path(step_dir)
    # DeepSpeed prints progress bars and notes on stdout and stderr, which carry our results and errors
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        with safe_shards(step_dir):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {k: v.contiguous() for k, v in sd.items()}


def zero_to_universal(step_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal over a ZeRO-1/2/3 checkpoint's shards (read weights_only), into
    out_dir: per parameter the whole fp32 tensor and its Adam moments."""
    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    step_dir, out_dir = Path(step_dir), Path(out_dir)
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))  # DeepSpeed's forked workers inherit the guard
    args = argparse.Namespace(
        input_folder=str(step_dir),
        output_folder=str(out_dir),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )  # blt's models carry no Megatron universal_checkpoint_info
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        with safe_shards(step_dir):
            ds_to_universal(args)
    (out_dir.parent / "latest_universal").unlink(missing_ok=True)  # names out_dir; blt passes the tag itself
