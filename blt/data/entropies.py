"""Entropies of a prepared directory's training shards, computed once by an entropy model and kept
as float16 beside the shards; shared out over all ranks of a job, each rank its own shards.

    DIR/entropies/<key>/info.json       the entropy model (path, weights fingerprint) and seq_len
    DIR/entropies/<key>/<shard>.f16     one float16 per train id of the shard

    store = EntropyStore(prepared, model_fingerprint(patcher.model), seq_len)
    store.compute(patcher, rank, world_size)     # this rank's missing shards; finished ones are skipped
    arrays = store.load()                        # per shard, np.memmap float16

Window j of a shard covers ids [j * L, j * L + L), the inputs of training window j (blt/data/stream.py),
so a prepared entropy equals the one computed on the fly for that window, rounded to float16.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from blt.data.documents import DataError
from blt.data.shards import Prepared, write_json


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of an entropy model's weights (names, shapes, values): the same model wherever its files are."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EntropyStore:
    """The entropies of one entropy model (by fingerprint) at one seq_len, for one prepared directory."""

    def __init__(self, data: Prepared, fingerprint: str, seq_len: int, model_name: str = ""):
        self.data, self.fingerprint, self.seq_len, self.model_name = data, fingerprint, seq_len, model_name
        self.dir = data.root / "entropies" / hashlib.sha256(f"{fingerprint}:{seq_len}".encode()).hexdigest()[:16]

    def path(self, k: int) -> Path:
        return self.dir / f"{self.data.shards[k].id}.f16"

    def missing(self) -> list[int]:
        return [k for k in range(len(self.data.shards)) if not self.path(k).is_file()]

    def others(self) -> list[dict]:
        """The info of entropies in this directory computed by other models or at another seq_len."""
        found = []
        for info in sorted((self.data.root / "entropies").glob("*/info.json")):
            if info.parent != self.dir:
                try:
                    found.append(json.loads(info.read_text()))
                except (OSError, ValueError):
                    continue
        return found

    def compute(self, patcher, rank: int = 0, world_size: int = 1, batch: int = 16, log=print) -> int:
        """Compute this rank's share (shards rank, rank + world_size, ...) of the missing shards;
        returns the ids computed. Each shard is written to a temporary file and renamed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            write_json(
                self.dir / "info.json",
                {"model": self.model_name, "fingerprint": self.fingerprint, "seq_len": self.seq_len},
            )
        mine = [k for k in range(len(self.data.shards)) if k % world_size == rank and not self.path(k).is_file()]
        L, done, t0 = self.seq_len, 0, time.perf_counter()
        device = next(patcher.model.parameters()).device
        for k in mine:
            ids = self.data.tokens(k, "train")
            n = len(ids)
            out = np.zeros(n, dtype=np.float16)
            starts = np.arange(0, n, L)
            for b in range(0, len(starts), batch):
                rows = np.zeros((len(starts[b : b + batch]), L), dtype=np.int64)  # (b, L) bytes; PAD after the end
                for j, s in enumerate(starts[b : b + batch]):
                    chunk = ids[s : s + L]
                    rows[j, : len(chunk)] = chunk
                with torch.no_grad():
                    H = patcher.entropies(torch.from_numpy(rows).to(device)).float().cpu().numpy()  # (b, L)
                for j, s in enumerate(starts[b : b + batch]):
                    m = min(L, n - s)
                    out[s : s + m] = H[j, :m]
            tmp = self.path(k).with_name(f".{self.path(k).name}.tmp-{os.getpid()}")
            out.tofile(tmp)
            os.replace(tmp, self.path(k))
            done += n
        if mine:
            secs = time.perf_counter() - t0
            log(
                f"entropies: rank {rank} computed {len(mine)} shard(s), {done:,} bytes in {secs:.1f} s "
                f"({done / max(secs, 1e-9) / 1e6:.2f} MB/s) -> {self.dir}"
            )
        return done

    def load(self) -> list[np.ndarray]:
        """Per shard, its entropies (float16, memory-mapped); every shard must be computed."""
        arrays = []
        for k, s in enumerate(self.data.shards):
            p = self.path(k)
            n = s.splits["train"]["tokens"]
            if not p.is_file() or p.stat().st_size != 2 * n:
                raise DataError(
                    f"entropies '{p}' are missing or truncated; rerun `blt prepare --out {self.data.root} "
                    f"--entropy-model MODEL --seq-len {self.seq_len}` to compute them"
                )
            arrays.append(np.asarray(np.memmap(p, dtype=np.float16, mode="r")) if n else np.zeros(0, np.float16))
        return arrays
