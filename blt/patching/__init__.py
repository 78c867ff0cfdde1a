"""Patching: how byte sequences are cut into patches. Every rule returns `starts`, a (B, T) bool
tensor that is True where a new patch begins (position 0 always begins one); a start at byte t
never depends on a byte after t.

    registry.py       the modes (static.py, space.py, entropy.py, learned.py; each a base.Mode) and patch_starts
    rules.py          what every mode shares: max patch length, patch ids and lengths, entropies
    streaming.py      the same decisions one byte at a time (generation)
    patcher.py        the runtime Patcher, with the frozen entropy model when a mode needs one

    starts = patch_starts(tokens, cfg.patching, H)   # (B, T) bool, byte-level; H: entropies or router probabilities
    ids = patch_ids_from_starts(starts)                         # (B, T) patch index of every byte
"""

from blt.patching.entropy import entropy_starts, threshold_for_patch_size
from blt.patching.learned import ratio_loss, router_starts
from blt.patching.patcher import Patcher
from blt.patching.registry import MODES, mode_of, patch_starts
from blt.patching.rules import (
    entropy,
    entropy_from_logits,
    limit_patch_length,
    patch_ids_from_starts,
    patch_lengths,
    patch_sizes,
)
from blt.patching.space import space_starts, spacelike
from blt.patching.static import static_starts
from blt.patching.streaming import StreamingStarts

__all__ = [
    "MODES",
    "Patcher",
    "StreamingStarts",
    "entropy",
    "entropy_from_logits",
    "entropy_starts",
    "limit_patch_length",
    "mode_of",
    "patch_ids_from_starts",
    "patch_lengths",
    "patch_sizes",
    "patch_starts",
    "ratio_loss",
    "router_starts",
    "space_starts",
    "spacelike",
    "static_starts",
    "threshold_for_patch_size",
]
