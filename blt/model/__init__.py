"""Single-device PyTorch models: BLT and the plain byte LM (baseline and entropy model).
Nothing here imports an engine, a logger or the trainer."""

from blt.config import ModelConfig, PatchingConfig
from blt.model.blt import BLT
from blt.model.byte_lm import ByteLM


def build_model(cfg: ModelConfig, patching: PatchingConfig | None = None):
    """The model of a config's `model` section; pass its `patching` section too (learned patching
    puts a router in the model)."""
    return BLT(cfg, patching) if cfg.arch == "blt" else ByteLM(cfg)


__all__ = ["BLT", "ByteLM", "build_model"]
