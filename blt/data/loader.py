"""Batches from a packed token stream: shuffled training windows (resumable) and in-order eval windows.

    loader = ByteLoader(read_tokens(data.train), seq_len=1024, batch_size=8, seed=0, rank=r, world_size=w)
    x = next(loader)                     # (B, L + 1) int64; inputs x[:, :-1], targets x[:, 1:]
    state = loader.state_dict()          # JSON-able; ByteLoader(...).load_state_dict(state) continues exactly
    for x in eval_windows(val_tokens, 1024, 8): ...   # every target token scored exactly once
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from blt.data.corpus import DataError
from blt.tokens import PAD_ID


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows tokens[s : s + length] for each start s, read from the memmap."""
    idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]  # (B, length)
    return torch.from_numpy(tokens[idx].astype(np.int64))


class ByteLoader:
    """Random fixed-length windows of a packed token stream, resumable exactly.

    Window i is tokens[i * L : i * L + L + 1] (consecutive windows share one token), for
    i < (N - 1) // L. Epoch e visits the windows in the order permutation(rng([seed, e])); each step
    takes the next batch_size * world_size of them and rank r keeps its slice [r * B, (r + 1) * B),
    so the ranks together see what one process with batch size B * world_size would. An epoch's
    remainder smaller than a global batch is dropped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        n = len(tokens)
        global_batch = batch_size * world_size
        if n < seq_len + 1:
            raise DataError(f"the training split has {n:,} tokens (~bytes), fewer than data.seq_len + 1 = "
                            f"{seq_len + 1}; use a smaller data.seq_len or more data")
        if self.num_windows < global_batch:
            raise DataError(f"the training split has {n:,} tokens (~bytes): {self.num_windows} windows of "
                            f"data.seq_len={seq_len}, fewer than one global batch of {global_batch} (batch_size x "
                            f"processes); use a smaller data.seq_len or training.batch_size, or more data")
        self.epoch, self.index = 0, 0  # index: position in this epoch's permutation of the next global batch
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)
        self.last_indices: list[int] = []  # window indices of this rank's last batch (rows in order)

    @property
    def num_windows(self) -> int:
        """Training windows per epoch (before dropping the remainder)."""
        return (len(self.tokens) - 1) // self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> "ByteLoader":
        return self

    def __next__(self) -> torch.Tensor:
        global_batch = self.batch_size * self.world_size
        if self.index + global_batch > self.num_windows:  # drop the remainder, start the next epoch
            self.epoch, self.index = self.epoch + 1, 0
        chosen = self._permutation(self.epoch)[self.index: self.index + global_batch]  # (B * world,)
        self.index += global_batch
        mine = chosen[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]  # (B,)
        self.last_indices = mine.tolist()
        return _gather(self.tokens, mine * self.seq_len, self.seq_len + 1)  # (B, L + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_windows", self.num_windows) != self.num_windows or \
                state.get("seq_len", self.seq_len) != self.seq_len:
            raise DataError(
                f"the checkpoint's data position is for {state.get('num_windows')} windows of seq_len "
                f"{state.get('seq_len')}, but this run has {self.num_windows} of seq_len {self.seq_len}; "
                f"resume with the same data and data.seq_len, or start a new run")
        self.seed = int(state["seed"])
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """In-order windows of seq_len + 1 tokens, each sharing one token with the next, in batches.

    Every target token (positions 1 .. M, M = min(N - 1, max_tokens)) appears exactly once in some
    x[:, 1:]; the last window is padded on the right with PAD_ID, which the loss ignores.
    """
    num_targets = len(tokens) - 1
    if max_tokens is not None:
        num_targets = min(num_targets, max_tokens)
    if num_targets <= 0:
        return
    num_windows = -(-num_targets // seq_len)
    for first in range(0, num_windows, batch_size):
        rows = range(first, min(first + batch_size, num_windows))
        batch = np.full((len(rows), seq_len + 1), PAD_ID, dtype=np.int64)  # (b, L + 1)
        for j, i in enumerate(rows):
            start = i * seq_len
            end = min(start + seq_len, num_targets) + 1  # last position kept, exclusive
            batch[j, : end - start] = tokens[start:end]
        yield torch.from_numpy(batch)
