"""Continuous batching over the one generation loop (blt/generation/engine.py): requests join a
running batch as rows and leave it when they finish, so concurrent clients share every model step
instead of waiting in turn.

    batcher = Batcher(model, patcher, context=512, max_batch=16, max_queue=256)
    batcher.start()                                   # the model runs in one background thread
    row = Row(ids, Params(max_bytes=64, temperature=0.8, seed=0), emit)
    batcher.submit([row])                             # QueueFull when the queue has no room
    # emit(data: bytes, finish: str | None) is called from the model thread after every step
    batcher.stop()                                    # every unfinished row ends with "cancelled"
    Batcher(model, patcher, context=512, kv_cache_mb=64)   # paged KV caches, 64 MB in all

One step: rows that arrived join the engine (prefilled together), the engine samples one byte for
every row with the row's own seeded RNG and feeds the rest, and every row's byte (or end) is
emitted. So a row's bytes are those `Generator` gives for its prompt alone with the same seed,
whatever else shares the batch (up to float rounding of batched matrix products).

With `kv_cache_mb` the KV caches are paged (blt/generation/paged.py): the batch is bounded by
memory as well as by `max_batch`. Rows handed to the engine wait there until its pools have room
for their prompts, and rows the pools cannot hold mid-generation are preempted and prefilled again
later (the same bytes); `check_prompt` refuses a prompt the whole pools cannot hold.
"""

from __future__ import annotations

import collections
import threading

import torch

from blt.generation.engine import Engine, Row
from blt.generation.paged import KVPools


class QueueFull(RuntimeError):
    """The queue of rows waiting for a place in the batch is full (HTTP 429)."""


class Batcher:
    def __init__(
        self, model, patcher, context: int, max_batch: int = 16, max_queue: int = 256, kv_cache_mb: float | None = None
    ):
        """kv_cache_mb: paged KV caches of that many MB in all (None: a contiguous cache of the whole
        context per row); a budget too small for one block per pool raises KVBudgetError here."""
        self.model, self.patcher, self.context = model, patcher, context
        self.max_batch, self.max_queue, self.kv_cache_mb = max_batch, max_queue, kv_cache_mb
        self._engine = self._new_engine()
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
            "preemptions": 0,
        }

    def _new_engine(self) -> Engine:
        return Engine(self.model, self.patcher, self.context, kv_cache_mb=self.kv_cache_mb, budget_name="--kv-cache-mb")

    @property
    def pools(self) -> KVPools | None:
        """The engine's KV-cache pools (None: contiguous caches)."""
        return self._engine.pools

    def check_prompt(self, ids: int) -> None:
        """KVBudgetError if a prompt of `ids` ids (BOS included) cannot fit in the whole pools."""
        if self.pools is not None:
            self.pools.check(ids)

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
            self._waiting.extend(rows)
            self.counters["waiting"] = len(self._waiting) + len(self._engine.waiting)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End the model thread; every row not finished yet gets finish reason "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        engine = self._engine
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not engine.active and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    room = self.max_batch - len(engine.rows) - len(engine.waiting)  # the engine's waiting rows count
                    new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                    self.counters["waiting"] = len(self._waiting) + len(engine.waiting)
                try:
                    self._step(engine, new)
                except Exception as e:  # a failing step ends its rows, never the server
                    for r in engine.rows + list(engine.waiting) + new:
                        if r.finish is None:
                            r.finish = "error"
                            r.emit(f"{type(e).__name__}: {e}".encode(), "error")
                    engine = self._engine = self._new_engine()
                    self.counters["errors"] += 1
                self.counters["running"] = len(engine.rows)
                self.counters["waiting"] = len(self._waiting) + len(engine.waiting)
        with self._cond:
            for r in engine.rows + list(engine.waiting) + list(self._waiting):
                if r.finish is None:
                    r.finish = "cancelled"
                    r.emit(b"", "cancelled")
            self._waiting.clear()

    def _step(self, engine: Engine, new: list[Row]) -> None:
        """New rows join (rows cancelled while waiting do not); one engine step (one batched model
        step for every running row); every row's byte or end is emitted."""
        self.counters["cancelled"] += sum(r.cancelled for r in [*engine.rows, *engine.waiting, *new])
        prefills, preemptions = engine.counts["prefills"], engine.counts["preemptions"]
        for r in engine.add([r for r in new if not r.cancelled]):  # max_bytes 0: nothing to generate
            r.emit(b"", r.finish)
        events = engine.step()
        for r, byte in events:
            self.counters["bytes"] += byte is not None
            r.emit(b"" if byte is None else bytes([byte]), r.finish)
        self.counters["rows_done"] += sum(r.finish is not None for r, _ in events)
        self.counters["prefills"] += engine.counts["prefills"] - prefills
        self.counters["preemptions"] += engine.counts["preemptions"] - preemptions
        if events:
            self.counters["steps"] += 1
            self.counters["row_steps"] += len(events)
            self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(events))

    def stats(self) -> dict:
        c = dict(self.counters)
        c["mean_batch"] = c["row_steps"] / c["steps"] if c["steps"] else 0.0
        if self.pools is not None:
            c["kv_cache"] = self.pools.stats()
        return c
