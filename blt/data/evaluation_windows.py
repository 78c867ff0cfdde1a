"""In-order evaluation windows of a packed id stream (training windows: blt/data/stream.py).

for x in eval_windows(val_tokens, 1024, 8): ...   # (b, L + 1); every target id scored exactly once
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from blt.tokens import PAD_ID


def eval_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterator[torch.Tensor]:
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
