"""Any MODEL path -> the model, its config and its patcher: a run dir (its newest complete
checkpoint), a checkpoint step dir of any engine and ZeRO stage, or an export dir. eval,
generate, patch, export, the HF converter, fine-tuning (`training.init_from`) and the entropy
model of entropy patching all load through here.

    loaded = load_model("runs/tiny")          # .model (eval mode), .cfg, .patcher, .where, .meta
    patcher = build_patcher(cfg, device)      # the config's patching, its entropy model loaded
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from blt.artifacts.checkpoints import CheckpointError, checkpoint_config, find_checkpoint, load_weights, read_state_json
from blt.artifacts.exports import is_export, load_export
from blt.config import Config, ConfigError, PatchingConfig
from blt.model import build_model
from blt.patching import Patcher, mode_of


@dataclass
class Loaded:
    model: nn.Module  # in eval mode, on the device asked for
    cfg: Config  # the resolved config it was trained with (patching threshold included)
    where: Path  # the step dir or export dir that was read
    meta: dict = field(default_factory=dict)  # source, step, val (last validation), threshold
    patcher: Patcher | None = None  # None when loaded with patcher=False


def load_model(path: str | Path, device: str = "cpu", patcher: bool = True) -> Loaded:
    """The model behind `path` with its weights (safetensors, or ZeRO shards read safely)."""
    if is_export(path):
        model, cfg, meta = load_export(path, device)
        where = Path(path)
    else:
        where = find_checkpoint(path)
        cfg = checkpoint_config(where)
        model = build_model(cfg.model, cfg.patching)
        load_weights(model, where)
        model = model.to(device).eval()
        state = read_state_json(where)
        meta = {
            "source": str(where.resolve()),
            "step": state.get("step"),
            "val": state.get("last_val") or {},
            "threshold": state.get("threshold"),
        }
    out = Loaded(model, cfg, where, meta)
    if patcher:  # the saved config holds the threshold it was trained with
        out.patcher = build_patcher(cfg, device)
    return out


def build_patcher(cfg: Config, device="cpu") -> Patcher:
    """The patcher of a config: a byte LM's patches are single bytes; a mode that reads entropies
    gets its frozen entropy model (patching.entropy_model) loaded here."""
    if cfg.model.arch == "byte_lm":
        return Patcher(PatchingConfig(mode="static", patch_size=1, max_patch_length=None))
    p = cfg.patching
    if not mode_of(p).needs_entropies:
        return Patcher(p)
    if not p.entropy_model:
        raise ConfigError(f"patching.mode={p.mode} needs patching.entropy_model (a run dir of a byte_lm)")
    try:
        ent = load_model(p.entropy_model, device, patcher=False)
    except CheckpointError as e:
        raise ConfigError(f"patching.entropy_model: {e} (train one with `blt train entropy_tiny`)") from None
    if ent.cfg.model.arch != "byte_lm":
        raise ConfigError(
            f"patching.entropy_model '{p.entropy_model}' is a {ent.cfg.model.arch} model; it must be a byte_lm"
        )
    for w in ent.model.parameters():
        w.requires_grad_(False)
    weights = ent.where / "model.safetensors"  # a ZeRO-3 checkpoint has only shards (and state.json)
    st = (weights if weights.is_file() else ent.where / "state.json").stat()
    return Patcher(p, ent.model, f"{ent.where.resolve()}:{st.st_size}:{st.st_mtime_ns}")
