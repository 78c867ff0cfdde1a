"""Continuous batching over the cached generator: requests join a running batch as rows and leave
it when they finish, so concurrent clients share every model step instead of waiting in turn.

    batcher = Batcher(model, patcher, context=512, max_batch=16, max_queue=256)
    batcher.start()                                   # the model runs in one background thread
    row = Row(ids, Params(max_bytes=64, temperature=0.8, seed=0), emit)
    batcher.submit([row])                             # QueueFull when the queue has no room
    # emit(data: bytes, finish: str | None) is called from the model thread after every step
    batcher.stop()                                    # every unfinished row ends with "cancelled"

One step: rows that arrived are prefilled in a batch of their own (their whole prompt, one call)
and appended to the running batch; every row samples one byte with its own seeded RNG; rows that
finished (EOS, a stop string, max_bytes) or whose client went away leave; the rest are fed their
new byte together (one IncrementalBLT step for the whole batch). A row whose context is full
restarts on the last half of its context, as `Generator` does, but alone: the other rows go on.
So a row's bytes are those `Generator` gives for its prompt alone with the same seed, whatever
else shares the batch (up to float rounding of batched matrix products).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from blt.generation.generator import CachedState
from blt.generation.sampling import byte_logits, sample_next
from blt.tokens import EOS_ID, OFFSET


class QueueFull(RuntimeError):
    """The queue of rows waiting for a place in the batch is full (HTTP 429)."""


@dataclass
class Params:
    max_bytes: int  # bytes to generate at most ("length" when reached)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: Sequence[bytes] = ()  # the row ends right after producing one of these ("stop")


@dataclass
class Row:
    """One sequence being generated: [BOS] + prompt byte ids (+ generated ids as they come)."""

    ids: list[int]
    params: Params
    emit: Callable[[bytes, str | None], None]  # (new bytes, finish reason or None), from the model thread
    out: bytearray = field(default_factory=bytearray)
    cancelled: bool = False  # set by the client's side: the row leaves at the next step
    finish: str | None = None
    gen: torch.Generator | None = None


class Batcher:
    def __init__(self, model, patcher, context: int, max_batch: int = 16, max_queue: int = 256):
        self.model, self.patcher, self.context = model, patcher, context
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self._waiting: collections.deque[Row] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # counters (read by /health): decode steps, rows in them, prefill calls, the largest batch
        self.counters = {
            "steps": 0,
            "row_steps": 0,
            "prefills": 0,
            "max_batch_seen": 0,
            "rows_done": 0,
            "bytes": 0,
            "running": 0,
            "waiting": 0,
            "errors": 0,
            "cancelled": 0,
        }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="blt-batcher", daemon=True)
        self._thread.start()

    def submit(self, rows: list[Row]) -> None:
        """Queue rows for the batch; QueueFull if fewer than len(rows) places are left."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting for the batch (at most {self.max_queue}); retry later"
                )
            for r in rows:
                r.gen = torch.Generator(device=self.device).manual_seed(r.params.seed)
                if r.params.max_bytes == 0:  # nothing to generate
                    r.finish = "length"
                    r.emit(b"", "length")
                else:
                    self._waiting.append(r)
            self.counters["waiting"] = len(self._waiting)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End the model thread; every row not finished yet gets finish reason "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        rows: list[Row] = []
        state, logits = None, None
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not rows and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    new = [self._waiting.popleft() for _ in range(min(self.max_batch - len(rows), len(self._waiting)))]
                    self.counters["waiting"] = len(self._waiting)
                try:
                    rows, state, logits = self._step(rows, state, logits, new)
                except Exception as e:  # a failing step ends its rows, never the server
                    for r in rows + new:
                        if r.finish is None:
                            r.finish = "error"
                            r.emit(f"{type(e).__name__}: {e}".encode(), "error")
                    rows, state, logits = [], None, None
                    self.counters["errors"] += 1
                self.counters["running"] = len(rows)
        with self._cond:
            for r in rows + list(self._waiting):
                if r.finish is None:
                    r.finish = "cancelled"
                    r.emit(b"", "cancelled")
            self._waiting.clear()

    def _prefill(self, seqs: list[list[int]]) -> tuple[CachedState, torch.Tensor]:
        """A fresh cached state for these rows, fed each one's last `context` ids -> (B, V) logits."""
        self.counters["prefills"] += 1
        st = CachedState(self.model, self.patcher, len(seqs), self.context)
        return st, st.feed([s[-self.context :] for s in seqs])

    def _join(self, state, logits, more_state, more_logits):
        if state is None:
            return more_state, more_logits
        state.append(more_state)
        return state, torch.cat([logits, more_logits])

    def _keep(self, rows, state, logits, keep: list[int]):
        """Only rows[keep] go on (None state when none is left)."""
        if len(keep) == len(rows):
            return rows, state, logits
        if not keep:
            return [], None, None
        state.take(keep)
        return [rows[i] for i in keep], state, logits[keep] if logits is not None else None

    def _step(self, rows: list[Row], state, logits, new: list[Row]):
        # rows whose client went away leave; rows that arrived join, prefilled together
        self.counters["cancelled"] += sum(r.cancelled for r in rows) + sum(r.cancelled for r in new)
        rows, state, logits = self._keep(rows, state, logits, [i for i, r in enumerate(rows) if not r.cancelled])
        new = [r for r in new if not r.cancelled]
        if new:
            state, logits = self._join(state, logits, *self._prefill([r.ids for r in new]))
            rows = rows + new
        if not rows:
            return rows, state, logits
        # one byte per row, each with its own RNG and options
        for i, tok in enumerate(self._sample(rows, byte_logits(logits))):
            r, p = rows[i], rows[i].params
            if tok == EOS_ID:
                r.finish = "stop"
                r.emit(b"", "stop")
                continue
            r.ids.append(tok)
            r.out.append(tok - OFFSET)
            self.counters["bytes"] += 1
            if any(r.out.endswith(s) for s in p.stop if s):
                r.finish = "stop"
            elif len(r.out) >= p.max_bytes:
                r.finish = "length"
            r.emit(bytes([tok - OFFSET]), r.finish)
        self.counters["rows_done"] += sum(r.finish is not None for r in rows)
        # finished rows leave; full rows restart alone on the last half of their context
        alive = [i for i, r in enumerate(rows) if r.finish is None and not r.cancelled]
        lens = state.lens.tolist()
        restart = [i for i in alive if lens[i] + 1 > self.context]
        go_on = [i for i in alive if lens[i] + 1 <= self.context]
        full = [rows[i] for i in restart]
        rows, state, _ = self._keep(rows, state, None, go_on)
        logits = None
        if rows:
            logits = state.feed([[r.ids[-1]] for r in rows])
            self.counters["steps"] += 1
            self.counters["row_steps"] += len(rows)
            self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(rows))
        if full:
            state, logits = self._join(state, logits, *self._prefill([r.ids[-(self.context // 2) :] for r in full]))
            rows = rows + full
        return rows, state, logits

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """(B, V) logits -> each row's next id: rows with the same options are sampled together, each
        with a uniform draw from its own RNG (what `sample_next` would draw for it alone)."""
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(rows):
            groups[(r.params.temperature, r.params.top_k, r.params.top_p)].append(i)
        out = [0] * len(rows)
        for (temperature, top_k, top_p), idx in groups.items():
            draws = (
                None
                if temperature <= 0
                else torch.cat([torch.rand(1, generator=rows[i].gen, device=self.device) for i in idx])
            )
            for i, tok in zip(idx, sample_next(logits[idx], temperature, top_k, top_p, None, draws).tolist()):
                out[i] = tok
        return out

    def stats(self) -> dict:
        c = dict(self.counters)
        c["mean_batch"] = c["row_steps"] / c["steps"] if c["steps"] else 0.0
        return c
