"""`patch_starts` one byte at a time, for generation: whether each arriving byte begins a patch,
decided from what came before (and, for space patching, the byte itself), with the same rules and
the same result as `patch_starts` on the whole sequence. One state per row.

    ss = StreamingStarts(cfg.patching, threshold)
    start = ss.push(byte_id, signal)   # signal: H of predicting this byte (entropy), the router's p (learned)
"""

from __future__ import annotations

from blt.patching.registry import mode_of
from blt.tokens import BOS_ID


class StreamingStarts:
    def __init__(self, cfg, threshold: float | None = None):
        self.cfg = cfg
        self.rule = mode_of(cfg).stream(cfg, threshold)
        self.t = 0  # position of the next byte in the window
        self.seg_start = 0  # last start before max_patch_length cuts

    def push(self, token: int, signal: float | None = None) -> bool:
        c, t = self.cfg, self.t
        start = self.rule.push(t, token, signal) or t == 0
        start = start or token == BOS_ID or (c.split_first_byte and t == 1)
        if start:
            self.seg_start = t
        elif c.max_patch_length is not None and (t - self.seg_start) % c.max_patch_length == 0:
            start = True
        self.t += 1
        return start
