"""Entropies of a whole packed split, computed once by a Patcher's entropy model in windows
aligned with the training windows, and kept as a float32 memmap beside the packed data.

    cache = EntropyCache.build(patcher, train_tokens, seq_len, data_dir)
    H = cache.windows(loader.last_indices)     # (B, L) entropies of those training windows
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch


class EntropyCache:
    """Entropies of a whole packed split, computed once in windows aligned with the training
    windows (window i covers stream positions [i*L, i*L + L)), kept as a float32 memmap."""

    def __init__(self, path: Path, seq_len: int):
        self.seq_len = seq_len
        self.values = np.memmap(path, dtype=np.float32, mode="r")

    @classmethod
    def build(cls, patcher, tokens: np.ndarray, seq_len: int, out_dir: Path, batch: int = 16, log=print):
        key = hashlib.sha256(f"{patcher.source}|{seq_len}|{len(tokens)}".encode()).hexdigest()[:16]
        path = Path(out_dir) / f"entropies-{key}.f32"
        if not path.exists():
            n = len(tokens)
            windows = (n + seq_len - 1) // seq_len
            log(f"caching entropies for {n:,} bytes in {windows} windows -> {path}")
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(n,))
            for w0 in range(0, windows, batch):
                rows = []
                for w in range(w0, min(windows, w0 + batch)):
                    row = np.zeros(seq_len, dtype=np.int64)
                    chunk = tokens[w * seq_len : (w + 1) * seq_len]
                    row[: len(chunk)] = chunk
                    rows.append(row)
                H = patcher.entropies(torch.from_numpy(np.stack(rows))).numpy()  # (b, L)
                for j, w in enumerate(range(w0, min(windows, w0 + batch))):
                    m = min(seq_len, n - w * seq_len)
                    out[w * seq_len : w * seq_len + m] = H[j, :m]
            out.flush()
            del out
            os.replace(tmp, path)
        return cls(path, seq_len)

    def windows(self, indices: list[int]) -> torch.Tensor:
        """Entropies (B, L) of the inputs of training windows `indices`."""
        L = self.seq_len
        return torch.from_numpy(np.stack([np.asarray(self.values[i * L : i * L + L]) for i in indices]))
