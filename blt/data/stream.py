"""The global training stream: windows of every source, mixed by weight, read by each rank for its
share of each global batch, with a background prefetch; resumable exactly on any number of ranks.

    loader = StreamLoader(sources, seq_len=1024, batch_size=8, seed=0, rank=r, world_size=w)
    batch = next(loader)       # .tokens (B, L + 1) int64 bytes; .sources (B,); .windows (B,); .entropies
    state = loader.state_dict()             # JSON-able: the stream position and bytes seen per source
    loader.load_state_dict(state)           # continues exactly, whatever this run's world size

The stream is built with Grain's random-access datasets (`grain.MapDataset`): per source, its
windows in a seeded global shuffle (`shuffle`, reshuffled every epoch by `repeat`), the sources
interleaved in proportion to their weights (`MapDataset.mix`). Item i of the stream is a pure
function of i, so the position (items consumed) is the whole data state. Step after step, the
ranks take consecutive slices of the next batch_size * world_size items, so the stream does not
depend on the number of ranks: a job resumed on another number of processes (with the same
global batch) reads what the uninterrupted job would have read.

Window w of a source is ids [j * L, j * L + L + 1) of one of its shards (windows do not cross
shards; each shard's last partial window is not trained on).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch

from blt.data.documents import DataError
from blt.data.shards import Prepared


def _grain():
    logging.getLogger("absl").setLevel(logging.ERROR)  # grain looks for jax's profiler and warns
    import grain

    return grain


@dataclass
class Source:
    """One weighted source of training data: its prepared directory (train split) and, when its
    entropies are precomputed, one float16 array per shard."""

    name: str
    weight: float
    data: Prepared
    entropies: list[np.ndarray] | None = None


class Windows:
    """The training windows of one source: shard k holds (ids_k - 1) // L of them; the source's
    windows are numbered from `offset` in the stream's window numbering (sources back to back)."""

    def __init__(self, source: Source, seq_len: int, offset: int = 0):
        self.source, self.seq_len, self.offset = source, seq_len, offset
        counts = [max(0, (s.splits["train"]["tokens"] - 1) // seq_len) for s in source.data.shards]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (shards + 1,)
        self.count = int(self.first[-1])

    def read(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows w (this source's numbering): their ids (n, L + 1), and the entropies of their first
        L ids (n, L) or None without precomputed ones."""
        L = self.seq_len
        shard = np.searchsorted(self.first, w, side="right") - 1  # (n,)
        start = (w - self.first[shard]) * L  # (n,) first id of each window in its shard
        ids = np.empty((len(w), L + 1), dtype=np.int64)
        ent = np.empty((len(w), L), dtype=np.float32) if self.source.entropies is not None else None
        for j, (k, a) in enumerate(zip(shard.tolist(), start.tolist())):
            ids[j] = self.source.data.read(k, "train", a, a + L + 1)
            if ent is not None:
                ent[j] = self.source.entropies[k][a : a + L]
        return ids, ent


def _seed(seed: int, name: str) -> int:
    """A source's shuffle seed: its own, so adding a source leaves the others' orders alone."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def mixture(windows: list[Windows], seed: int):
    """The infinite stream of window numbers (sources back to back), a random-access grain.MapDataset."""
    grain = _grain()
    per_source = [
        grain.MapDataset.range(w.offset, w.offset + w.count).shuffle(seed=_seed(seed, w.source.name)).repeat()
        for w in windows
    ]
    if len(per_source) == 1:
        return per_source[0]
    return grain.MapDataset.mix(per_source, [w.source.weight for w in windows])


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, L + 1) int64; inputs [:, :-1], targets [:, 1:]
    sources: np.ndarray  # (B,) index of each row's source
    windows: np.ndarray  # (B,) each row's window, numbered across sources (sources back to back)
    entropies: torch.Tensor | None  # (B, L) float32 entropies of the inputs, when precomputed


class _Batches:
    """Random access to this rank's batches from stream position `start` (a Grain data source)."""

    def __init__(self, stream, windows: list[Windows], start: int, batch_size: int, rank: int, world_size: int):
        self.stream, self.windows, self.start = stream, windows, start
        self.B, self.rank, self.G = batch_size, rank, batch_size * world_size
        self.offsets = np.array([w.offset for w in windows] + [windows[-1].offset + windows[-1].count])

    def __len__(self) -> int:
        return (sys.maxsize - self.start) // self.G - 1

    def __getitem__(self, i: int) -> Batch:
        first = self.start + i * self.G + self.rank * self.B  # this rank's rows of global batch i
        ids = np.array([self.stream[j] for j in range(first, first + self.B)], dtype=np.int64)  # (B,) windows
        source = np.searchsorted(self.offsets, ids, side="right") - 1  # (B,)
        tokens = np.empty((self.B, self.windows[0].seq_len + 1), dtype=np.int64)  # (B, L + 1)
        entropies = None
        for k in np.unique(source).tolist():
            rows = source == k
            tokens[rows], ent = self.windows[k].read(ids[rows] - self.offsets[k])
            if ent is not None:
                if entropies is None:
                    entropies = np.empty((self.B, self.windows[0].seq_len), dtype=np.float32)  # (B, L)
                entropies[rows] = ent
        return Batch(torch.from_numpy(tokens), source, ids, None if entropies is None else torch.from_numpy(entropies))


class StreamLoader:
    """This rank's batches of the global stream (see the module docstring); `prefetch` batches are
    read ahead by a background thread."""

    def __init__(
        self,
        sources: list[Source],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.sources, self.seq_len, self.batch_size = sources, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.prefetch = seed, rank, world_size, prefetch
        self.windows: list[Windows] = []
        for s in sources:
            self.windows.append(Windows(s, seq_len, sum(w.count for w in self.windows)))
        for w in self.windows:
            if w.count == 0:
                n = w.source.data.totals("train")[0]
                raise DataError(
                    f"source '{w.source.name}' has {n:,} training ids (~bytes), no shard with more than "
                    f"data.seq_len={seq_len}; use a smaller data.seq_len or more data"
                )
        self.position = 0  # stream items consumed by all ranks together
        self.seen = np.zeros(len(sources), dtype=np.int64)  # windows trained on per source, all ranks (record)
        self._stream = mixture(self.windows, seed)
        self._it = None

    def _iterator(self):
        if self._it is None:
            grain = _grain()
            batches = _Batches(self._stream, self.windows, self.position, self.batch_size, self.rank, self.world_size)
            options = grain.ReadOptions(num_threads=1 if self.prefetch else 0, prefetch_buffer_size=self.prefetch)
            self._it = iter(grain.MapDataset.source(batches).to_iter_dataset(options))
        return self._it

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iterator())
        self.position += self.batch_size * self.world_size
        return batch

    def record(self, counts) -> None:
        """Count windows trained on per source (summed over ranks by the caller); saved with the position."""
        self.seen += np.asarray(counts, dtype=np.int64)

    def use_entropies(self, entropies: list[list[np.ndarray]]) -> None:
        """Read precomputed entropies (per source, per shard) with every batch from now on."""
        for s, e in zip(self.sources, entropies):
            s.entropies = e
        self._it = None

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n windows (n, L + 1) of another stream (seed), e.g. to calibrate an entropy threshold."""
        return _Batches(mixture(self.windows, seed), self.windows, 0, n, 0, 1)[0].tokens

    def bytes_seen(self) -> dict[str, int]:
        """Training bytes (input positions) of each source recorded so far."""
        return {s.name: int(c) * self.seq_len for s, c in zip(self.sources, self.seen)}

    def describe(self) -> list[dict]:
        return [{"name": w.source.name, "weight": w.source.weight, "windows": w.count} for w in self.windows]

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "seen": self.seen.tolist(),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": self.describe(),
            "global_batch": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if "position" not in state:
            raise DataError(
                "the checkpoint's data position is in the format of an older blt (one packed split); "
                "start a new run, or resume it with the blt that wrote it"
            )
        if state["seq_len"] != self.seq_len or state["sources"] != self.describe() or state["seed"] != self.seed:
            have = ", ".join(f"{s['name']} ({s['windows']} windows, weight {s['weight']:g})" for s in self.describe())
            was = ", ".join(f"{s['name']} ({s['windows']} windows, weight {s['weight']:g})" for s in state["sources"])
            raise DataError(
                f"the checkpoint's data position is for data.seq_len={state['seq_len']}, seed "
                f"{state['seed']} and sources {was}, but this run has data.seq_len={self.seq_len}, seed "
                f"{self.seed} and {have}; resume with the same data, or start a new run"
            )
        self.position, self.seen = int(state["position"]), np.array(state["seen"], dtype=np.int64)
        self._it = None
