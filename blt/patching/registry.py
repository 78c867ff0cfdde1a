"""The patching modes, and the one place a mode name is looked up: `mode_of(cfg)`. A new mode is
one module with a `Mode` subclass (see base.py) and one entry in MODES.

    starts = patch_starts(tokens, cfg.patching, H)   # (B, T) bool, byte-level; H: entropies or router probabilities
"""

from __future__ import annotations

import torch

from blt.errors import ConfigError
from blt.patching.base import Mode
from blt.patching.entropy import Entropy
from blt.patching.learned import Learned
from blt.patching.rules import limit_patch_length
from blt.patching.space import Space
from blt.patching.static import Static
from blt.tokens import BOS_ID

MODES: dict[str, Mode] = {m.name: m for m in (Static(), Space(), Entropy(), Learned())}


def mode_of(cfg) -> Mode:
    """The Mode of a patching config section."""
    try:
        return MODES[cfg.mode]
    except KeyError:
        raise ValueError(f"unknown patching mode '{cfg.mode}' (known: {', '.join(MODES)})") from None


def check_patching(cfg, model) -> None:
    """The patching section's mode checks, for a model config `model`; each a one-line ConfigError."""
    if cfg.mode not in MODES:
        raise ConfigError(f"config key 'patching.mode' must be one of {' | '.join(map(repr, MODES))}, got {cfg.mode!r}")
    mode = MODES[cfg.mode]
    if model.arch == "blt" and model.hf_compat and mode.start_reads_its_byte:
        raise ConfigError(
            f"model.hf_compat=true cannot use patching.mode={cfg.mode} (whether byte t+1 starts a patch "
            "depends on byte t+1 itself, which HF's decoder rule would leak); use a mode whose starts "
            "read earlier bytes only: " + ", ".join(n for n, m in MODES.items() if not m.start_reads_its_byte)
        )
    problem = mode.check(cfg, model.arch)
    if problem:
        raise ConfigError(problem)


def patch_starts(
    tokens: torch.Tensor, cfg, signal: torch.Tensor | None = None, threshold: float | None = None
) -> torch.Tensor:
    """Patch starts (B, T) bool for `tokens` (B, T) under `cfg`: the mode's rule (reading `signal`
    (B, T), entropies or router probabilities, if it needs one), then the shared ones (a BOS always
    starts a patch; split_first_byte; max_patch_length)."""
    starts = mode_of(cfg).starts(tokens, cfg, signal, threshold)
    starts = starts | (tokens == BOS_ID)
    if cfg.split_first_byte and starts.shape[1] > 1:
        starts[:, 1] = True
    return limit_patch_length(starts, cfg.max_patch_length)
