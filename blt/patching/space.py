"""Space patching (SpaceByte's rule): a patch starts at a non-spacelike byte that follows a
spacelike one, so "hello world" -> "hello ", "world"; runs of spaces and punctuation stay in one
patch. Whether byte t starts a patch depends on byte t itself."""

from __future__ import annotations

import torch

from blt.patching.base import Mode, StreamRule
from blt.tokens import OFFSET


def spacelike(tokens: torch.Tensor) -> torch.Tensor:
    """A byte is spacelike unless it is an ASCII letter or digit or a UTF-8 non-ASCII byte (lead or
    continuation). Special ids (BOS/EOS/PAD) count as spacelike."""
    b = tokens - OFFSET
    letter = ((b >= ord("a")) & (b <= ord("z"))) | ((b >= ord("A")) & (b <= ord("Z")))
    digit = (b >= ord("0")) & (b <= ord("9"))
    non_ascii = b >= 0x80
    return ~(letter | digit | non_ascii)


def is_spacelike(token: int) -> bool:
    """`spacelike` for one id, in plain Python (generation decides one byte at a time)."""
    b = token - OFFSET
    return not (ord("a") <= b <= ord("z") or ord("A") <= b <= ord("Z") or ord("0") <= b <= ord("9") or b >= 0x80)


def space_starts(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T) bool: a start at each non-spacelike byte after a spacelike one."""
    sp = spacelike(tokens)  # (B, T)
    starts = torch.zeros_like(sp)
    starts[:, 1:] = sp[:, :-1] & ~sp[:, 1:]
    starts[:, 0] = True
    return starts


class Space(Mode):
    name = "space"
    start_reads_its_byte = True

    def starts(self, tokens, cfg, entropies, threshold) -> torch.Tensor:
        return space_starts(tokens)

    def stream(self, cfg, threshold) -> StreamRule:
        return _AfterSpace()

    def assumed_patch_size(self, cfg) -> float:
        return 5.0  # about one English word

    def hf_refusal(self, cfg):
        return "patching.mode", "HF has no space patching; use static or entropy"


class _AfterSpace(StreamRule):
    def __init__(self):
        self.prev_space = True  # the byte before position 0 never matters: position 0 always starts

    def push(self, t: int, token: int, entropy) -> bool:
        space = is_spacelike(token)
        start = self.prev_space and not space
        self.prev_space = space
        return start
