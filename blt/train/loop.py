"""The training loop: data -> patches -> model -> loss -> engine, with validation in bits per
byte, checkpoints, resume, metrics.jsonl and a progress bar.

    blt train configs/tiny.yaml training.steps=200

SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) finishes the current step, saves a
checkpoint and exits; `checkpoint.resume=auto` (the default) continues from it. A second Ctrl-C
stops at once. A failure after a step completed saves that step first (a non-finite loss, which
every process sees, in a job of any size; any other error in a one-process run), then stops
(that bookkeeping: blt/train/recovery.py).

The run directory is only created once everything that can be checked has been, and a start that
fails before completing a step takes back what it wrote: a failed start leaves nothing behind.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blt.config import Config
from blt.data import PAD_ID
from blt.device import peak_memory_gb
from blt.patching import patch_sizes
from blt.proc import log
from blt.train.build import (
    build_data,
    build_device,
    build_engine,
    build_initial_model,
    build_meter,
    build_patching,
    build_run_dir,
    describe_model,
    engine_class,
    resume_or_calibrate,
    start_line,
    start_run_files,
)
from blt.train.distributed import choose_engine, is_peer_failure, launched_world, shutdown
from blt.train.engine import DivergedError
from blt.train.metrics import MetricsLogger
from blt.train.optim import lr_at
from blt.train.recovery import Recovery, finish_the_error_message, peer_lost
from blt.train.tasks import TaskEval, find_eval_tasks
from blt.train.validation import Validation


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over non-padding targets."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, plain behaviour
                pass
        return self

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One run of `blt train`: built step by step (blt/train/build.py), then trained by `run`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.world = world = launched_world()
        kind = choose_engine(cfg, world)
        tasks = find_eval_tasks(cfg)  # an unknown eval.tasks name stops here, before anything is made
        self.device, amp_dtype = build_device(cfg, world)
        engine_class(kind).prepare(cfg, world, self.device, kind)  # the engine's config changes, process group
        self.rundir = build_run_dir(cfg, world)
        self.run_dir, resume_from = self.rundir.path, self.rundir.resume_from
        self.data, self.loader, val = build_data(cfg, world)
        self.patcher = build_patching(cfg, world, self.device, self.data, self.loader)
        model = build_initial_model(cfg, self.device, resume_from)
        info = describe_model(cfg, model, self.patcher, self.data)  # before ZeRO-3 partitions the weights
        self.engine = build_engine(cfg, world, kind, model, self.device, amp_dtype, resume_from)
        self.step, self.state = resume_or_calibrate(cfg, self.engine, self.loader, self.patcher, resume_from)
        self.validation = Validation(cfg, world, self.engine, self.patcher, val)
        self.task_eval = TaskEval(cfg, world, self.engine, self.patcher, tasks) if tasks else None
        self.start_step = self.step
        self.recovery = Recovery(self.loader, self.save, self.step, resume_from)  # what a failure saves
        self.last_val: dict = self.state.get("last_val", {})
        self.last_val_step: int = self.state.get("last_val_step", self.step)
        self.meter, peak = build_meter(cfg, world, self.device, self.engine.amp_dtype, info)
        self.trace = start_run_files(cfg, world, self.rundir, self.step, {**info, **peak})  # the first write
        log(start_line(cfg, world, self.engine, info, self.data, self.run_dir))

    def accumulate(self) -> dict:
        """Forward and backward over grad_accum micro-batches -> "sums": this rank's numbers for the
        step's metrics, by name (summed over ranks as they are); "times"; the "windows" it read."""
        self.recovery.step_begins()
        means = {"loss": 0.0}  # name -> sum over micro-batches of each one's mean: the loss, the mode's metrics
        nbytes, npatches, windows = 0, 0, []
        per_source = np.zeros(len(self.loader.sources))  # windows of each source in this rank's micro-batches
        times = {"data": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0}
        for _ in range(self.cfg.training.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.loader)
            windows += batch.windows.tolist()
            per_source += np.bincount(batch.sources, minlength=len(per_source))
            inputs, targets = batch.tokens[:, :-1].to(self.device), batch.tokens[:, 1:].to(self.device)  # (B, T) bytes
            ent = batch.entropies.to(self.device) if batch.entropies is not None else None  # (B, T) precomputed
            patch_ids = self.patcher.cut(inputs, ent)  # (B, T), or None where the model's router cuts them
            t1 = time.perf_counter()
            logits, patch_ids, routing = self.patcher.forward(self.engine.forward, inputs, patch_ids=patch_ids)
            loss = lm_loss(logits, targets)
            extra, mode_metrics = self.patcher.training_terms(routing, inputs)  # the patching mode's own terms
            self.engine.backward(loss if extra is None else loss + extra)
            means["loss"] += float(loss.detach())  # waits for the device: the timing below is honest
            for name, value in mode_metrics.items():
                means[name] = means.get(name, 0.0) + float(value)
            times["data"] += t1 - t0
            times["fwd_bwd"] += time.perf_counter() - t1
            nbytes += inputs.numel()
            npatches += int(patch_ids[:, -1].sum()) + len(patch_ids)
            self.meter.add_patch_lengths(patch_sizes(patch_ids).cpu().numpy())
        sums = {"means": means, "bytes": nbytes, "patches": npatches, "per_source": per_source.tolist()}
        return {"sums": sums, "times": times, "windows": windows}

    def update(self, lr: float, out: dict) -> float:
        """The optimizer step that completes step self.step + 1; returns the grad norm. After it the
        weights, optimizer, data position and step number agree again."""
        t = time.perf_counter()
        with self.recovery.update():
            grad_norm = self.engine.step(lr)
            self.step += 1
        out["times"]["optimizer"] = time.perf_counter() - t
        if self.trace is not None:
            self.trace.write(self.step, out["windows"])
        return grad_norm

    def validate(self, metrics: MetricsLogger) -> dict:
        """Validation at this step, with its pictures (blt/train/validation.py)."""
        return self.validation.run(self.step, metrics)

    def save(self, elapsed: float, prune: bool = True) -> Path:
        """Checkpoint this step through the engine, with the trainer's state; returns its directory."""
        path = self.engine.save(
            self.run_dir,
            self.step,
            {
                "data": self.loader.state_dict(),
                "threshold": self.patcher.threshold,
                "last_val": self.last_val,
                "last_val_step": self.last_val_step,
                "elapsed": elapsed,
            },
            prune,
        )
        self.recovery.saved(self.step, path)
        return path

    def log(self, metrics: MetricsLogger, lr: float, grad_norm: float, elapsed: float) -> None:
        """The log line of the steps since the last one (means, rates, bytes per source) and their
        patch-size histogram; the meter starts a new interval."""
        record = self.meter.record(self.step, lr, grad_norm)
        seen = (
            {f"data/bytes/{k}": v for k, v in self.loader.bytes_seen().items()} if len(self.loader.sources) > 1 else {}
        )
        metrics.log({**record, **seen, "peak_mem_gb": peak_memory_gb(self.device), "elapsed": elapsed})
        metrics.histogram(self.step, "patch_size", self.meter.hist.tolist())
        self.meter.reset()

    def discard_if_untrained(self) -> None:
        """After a failure before any step completed: a fresh run dir is removed again with all
        this start wrote into it (config.yaml, model_info.json, empty logs)."""
        if self.world.is_main and self.step == self.start_step:
            self.rundir.discard()

    def run(self) -> dict:
        """Train to training.steps (or max_minutes, or a stop signal); returns the last validation."""
        try:
            return self._run()
        except BaseException as e:
            if self.world.world_size > 1:
                finish_the_error_message()
            self.discard_if_untrained()
            if isinstance(e, Exception) and self.world.world_size > 1 and is_peer_failure(e):
                raise peer_lost(e, self.world.rank, self.step, self.run_dir) from None
            raise

    def _run(self) -> dict:
        c, world = self.cfg, self.world
        metrics = MetricsLogger(
            self.run_dir,
            c.training.steps,
            self.step,
            c.logging.progress and world.is_main,
            enabled=world.is_main,
            cfg=c,
            resumed=self.step > 0,
        )
        t0, before = time.time(), self.state.get("elapsed", 0.0)

        def elapsed() -> float:
            return before + time.time() - t0

        self.meter.reset()  # sums since the last log line, over all ranks
        try:
            with StopRequest() as stop:
                if self.step >= c.training.steps and self.last_val_step < self.step:
                    # resumed at the end, before the final validation was done (it failed, or a stop came first)
                    self.last_val, self.last_val_step = self.validate(metrics), self.step
                    self.save(elapsed())
                while self.step < c.training.steps:
                    lr = lr_at(self.step, c.training.steps, c.optimizer.lr, c.schedule)
                    out = self.accumulate()
                    timed_out = c.training.max_minutes is not None and elapsed() > 60 * c.training.max_minutes
                    # one collective, before the update: the metrics' sums by name, and whether any rank was
                    # told to stop (all stop together) or met a non-finite loss (all skip the update together)
                    sums = world.all_sum_named({**out["sums"], "stops": stop.reason is not None, "timeouts": timed_out})
                    means = {k: v / (c.training.grad_accum * world.world_size) for k, v in sums["means"].items()}
                    if not math.isfinite(means["loss"]):
                        raise DivergedError(f"loss became {means['loss']}")
                    grad_norm = self.update(lr, out)
                    self.loader.record(sums["per_source"])  # windows per source of this step, all ranks
                    stop_reason = (stop.reason or "SIGTERM") if sums["stops"] else None
                    timed_out = sums["timeouts"] > 0
                    metrics.advance()
                    self.meter.add_step(means, sums["bytes"], sums["patches"], out["times"])
                    if self.step % c.logging.every == 0 or self.step == c.training.steps:
                        self.log(metrics, lr, grad_norm, elapsed())
                    last = self.step == c.training.steps or timed_out or stop_reason is not None
                    if (last and stop_reason is None) or (c.eval.every and self.step % c.eval.every == 0):
                        t_eval = time.time()
                        self.last_val, self.last_val_step = self.validate(metrics), self.step
                        self.meter.exclude(time.time() - t_eval)
                    if self.task_eval is not None and self.task_eval.due(self.step, last and stop_reason is None):
                        t_eval = time.time()
                        self.task_eval.run(self.step, metrics)
                        self.meter.exclude(time.time() - t_eval)
                    if last or self.step % c.checkpoint.every == 0:
                        path = self.save(elapsed())
                    if timed_out:
                        metrics.print(f"stopping at step {self.step}: training.max_minutes={c.training.max_minutes}")
                        break
                    if stop_reason is not None:
                        metrics.print(f"{stop_reason}: saved {path}; run the same command to resume")
                        break
        except DivergedError as e:  # every process of a job sees it at once, so all save together
            raise self.recovery.diverged(e, self.step, elapsed()) from None
        except Exception as e:
            if world.world_size == 1:  # in a job, a lost peer would leave the others waiting in the save
                self.recovery.save_after_failure(e, self.step, elapsed(), metrics.print)
            raise
        finally:
            metrics.close()
            if self.trace is not None:
                self.trace.close()
        return {"step": self.step, **self.last_val}


def train(cfg: Config) -> dict:
    """Train as `cfg` says (one process, or this process's part of a launched job); returns the
    last validation metrics."""
    try:
        return Trainer(cfg).run()
    finally:
        shutdown()
