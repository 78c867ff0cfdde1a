"""The training loop: data -> patches -> model -> loss -> engine, with validation in bits per
byte, checkpoints, resume, metrics.jsonl and a progress bar.

    blt train configs/tiny.yaml training.steps=200

SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) finishes the current step, saves a
checkpoint and exits; `checkpoint.resume=auto` (the default) continues from it. A second Ctrl-C
stops at once. A failure after a step completed saves that step first (a non-finite loss, which
every process sees, in a job of any size; any other error in a one-process run), then stops.

The run directory is only created once everything that can be checked has been, and a start that
fails before completing a step takes back what it wrote: a failed start leaves nothing behind.
"""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blt.artifacts.checkpoints import is_complete
from blt.config import Config
from blt.data import PAD_ID
from blt.patching import patch_sizes, ratio_loss
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
from blt.train.checkpoint import rng_state, set_rng_state
from blt.train.device import peak_memory_gb
from blt.train.distributed import PeerLostError, choose_engine, is_peer_failure, launched_world, shutdown
from blt.train.engine import DivergedError
from blt.train.metrics import MetricsLogger
from blt.train.optim import lr_at
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


def _finish_the_error_message() -> None:
    """A process of a job that is already failing ignores SIGTERM from here on: a launcher that saw
    another process die (torchrun) stops the rest with SIGTERM, and the default action would end this
    one silently between leaving the training loop and printing why (its group teardown takes a
    while). The launcher's SIGKILL after its grace period (torchrun: 30 s) still bounds the exit."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


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
        # what the last checkpoint holds, and what a failure would need to give back to save this step
        self.start_step = self.saved_step = self.step
        self.saved_path = resume_from
        self.last_val: dict = self.state.get("last_val", {})
        self.last_val_step: int = self.state.get("last_val_step", self.step)
        self._rewind: tuple[dict, dict] | None = None  # (data position, RNG) before the step under way
        self._updating = False  # inside the optimizer update: the weights are between two steps
        self.meter, peak = build_meter(cfg, world, self.device, self.engine.amp_dtype, info)
        self.trace = start_run_files(cfg, world, self.rundir, self.step, {**info, **peak})  # the first write
        log(start_line(cfg, world, self.engine, info, self.data, self.run_dir))

    def accumulate(self) -> dict:
        """Forward and backward over grad_accum micro-batches; returns this rank's sums for the metrics."""
        self._rewind = (self.loader.state_dict(), rng_state())
        loss_sum, nbytes, npatches, windows = 0.0, 0, 0, []
        per_source = np.zeros(len(self.loader.sources))  # windows of each source in this rank's micro-batches
        route_sums = [0.0, 0.0, 0.0]  # learned patching: ratio loss, boundary rate, mean probability
        times = {"data": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0}
        for _ in range(self.cfg.training.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.loader)
            windows += batch.windows.tolist()
            per_source += np.bincount(batch.sources, minlength=len(per_source))
            inputs, targets = batch.tokens[:, :-1].to(self.device), batch.tokens[:, 1:].to(self.device)  # (B, T) bytes
            ent = batch.entropies.to(self.device) if batch.entropies is not None else None  # (B, T) precomputed
            patch_ids = None if self.patcher.learned else self.patcher(inputs, ent)  # (B, T); learned: the model's
            t1 = time.perf_counter()
            logits, routing = self.engine.forward(inputs, patch_ids, routing=True)
            patch_ids = patch_ids if routing is None else routing.patch_ids
            loss = lm_loss(logits, targets)
            total = loss
            if routing is not None:  # learned patching: the ratio loss holds the mean patch size
                total = loss + self.cfg.patching.ratio_loss_weight * self.routing_terms(routing, inputs, route_sums)
            self.engine.backward(total)
            loss_sum += float(loss.detach())  # waits for the device: the timing below is honest
            times["data"] += t1 - t0
            times["fwd_bwd"] += time.perf_counter() - t1
            nbytes += inputs.numel()
            npatches += int(patch_ids[:, -1].sum()) + len(patch_ids)
            self.meter.add_patch_lengths(patch_sizes(patch_ids).cpu().numpy())
        return {
            "loss_sum": loss_sum,
            "bytes": nbytes,
            "patches": npatches,
            "times": times,
            "windows": windows,
            "per_source": per_source.tolist(),
            "routing": route_sums,
        }

    def routing_terms(self, routing, inputs: torch.Tensor, sums: list[float]) -> torch.Tensor:
        """The ratio loss of one micro-batch (with gradient); adds it, the router's boundary rate
        and its mean probability (over real bytes) to `sums`."""
        real = inputs != PAD_ID
        loss, _, mean_prob = ratio_loss(routing.probs, routing.starts, real, self.cfg.patching.target_patch_size)
        rate = (routing.router_starts & real).sum() / real.sum().clamp(min=1)
        for i, v in enumerate((loss, rate, mean_prob)):
            sums[i] += float(v.detach())
        return loss

    def update(self, lr: float, out: dict) -> float:
        """The optimizer step that completes step self.step + 1; returns the grad norm. After it the
        weights, optimizer, data position and step number agree again."""
        t = time.perf_counter()
        self._updating = True
        try:
            grad_norm = self.engine.step(lr)
        except DivergedError:  # raised before anything was updated
            self._updating = False
            raise
        self.step += 1
        self._rewind, self._updating = None, False
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
        self.saved_step, self.saved_path = self.step, path
        return path

    def save_last_good(self, elapsed: float) -> Path | None:
        """After a failure: save the last completed step (its weights, optimizer, data position and
        RNG), keeping every older checkpoint. None when it is saved already, or when the failure
        came inside the optimizer update (the weights are then between two steps)."""
        if self.step == self.saved_step or self._updating:
            return None
        if self._rewind is not None:  # a step was under way: give back the batches and random numbers it took
            data, rng = self._rewind
            self.loader.load_state_dict(data)
            set_rng_state(rng)
            self._rewind = None
        return self.save(elapsed, prune=False)

    def diverged(self, err: DivergedError, elapsed: float) -> DivergedError:
        """Save the last completed step; the one-line error says where to go from there. Resuming
        that step repeats the loss whatever the lr (the lr only enters the update after it), so
        it points to a checkpoint before the divergence."""
        what = f"{err} at step {self.step + 1}; lower optimizer.lr"
        try:
            saved = self.save_last_good(elapsed) or (self.saved_path if self.saved_step == self.step else None)
        except Exception as save_err:  # noqa: BLE001 - say both in the one line
            return DivergedError(
                f"{what} (saving step {self.step} failed: {type(save_err).__name__}: {str(save_err).strip()[:120]})"
            )
        if saved is None:  # no step completed: nothing to go back to (the run dir is taken back)
            return DivergedError(what)
        earlier = [d for d in sorted(Path(saved).parent.glob("step_*")) if is_complete(d) and d.name < Path(saved).name]
        where = (
            f"resume from before the divergence with checkpoint.resume={earlier[-1]}"
            if earlier
            else "start again in a new run_dir, as no checkpoint precedes the divergence"
        )
        return DivergedError(
            f"{what} and {where} (step {self.step} is saved in {saved}, but resuming it gives "
            "the same result whatever the lr)"
        )

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
                _finish_the_error_message()
            self.discard_if_untrained()
            if isinstance(e, Exception) and self.world.world_size > 1 and is_peer_failure(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # drop gloo's "[file.cc:537]" prefix
                raise PeerLostError(
                    f"rank {self.world.rank} lost another process of the job at step {self.step} ({first}); "
                    f"rerun the same command to resume from the newest complete checkpoint in "
                    f"{self.run_dir / 'checkpoints'}"
                ) from None
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
                    # one collective, before the update: metric sums, and whether any rank was told to stop
                    # (all stop together) or met a non-finite loss (all skip the update together)
                    loss_sum, nbytes, npatches, stops, timeouts, *rest = world.all_sum(
                        [
                            out["loss_sum"],
                            out["bytes"],
                            out["patches"],
                            stop.reason is not None,
                            timed_out,
                            *out["routing"],
                            *out["per_source"],
                        ]
                    )
                    route, per_source = rest[: len(out["routing"])], rest[len(out["routing"]) :]
                    loss = loss_sum / (c.training.grad_accum * world.world_size)
                    if not math.isfinite(loss):
                        raise DivergedError(f"loss became {loss}")
                    grad_norm = self.update(lr, out)
                    self.loader.record(per_source)  # windows per source of this step, all ranks
                    stop_reason = (stop.reason or "SIGTERM") if stops else None
                    timed_out = timeouts > 0
                    metrics.advance()
                    self.meter.add_step(loss, nbytes, npatches, out["times"])
                    if self.patcher.learned:
                        self.meter.add_routing(*(v / (c.training.grad_accum * world.world_size) for v in route))
                    if self.step % c.logging.every == 0 or self.step == c.training.steps:
                        record = self.meter.record(self.step, lr, grad_norm)
                        seen = (
                            {f"data/bytes/{k}": v for k, v in self.loader.bytes_seen().items()}
                            if len(self.loader.sources) > 1
                            else {}
                        )
                        metrics.log(
                            {**record, **seen, "peak_mem_gb": peak_memory_gb(self.device), "elapsed": elapsed()}
                        )
                        metrics.histogram(self.step, "patch_size", self.meter.hist.tolist())
                        self.meter.reset()
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
            raise self.diverged(e, elapsed()) from None
        except Exception as e:
            if world.world_size == 1:  # in a job, a lost peer would leave the others waiting in the save
                self.save_after_failure(e, metrics, elapsed())
            raise
        finally:
            metrics.close()
            if self.trace is not None:
                self.trace.close()
        return {"step": self.step, **self.last_val}

    def save_after_failure(self, err: Exception, metrics: MetricsLogger, elapsed: float) -> None:
        """Save the last completed step before the error goes on, and say where in one line."""
        try:
            path = self.save_last_good(elapsed)
        except Exception as save_err:  # noqa: BLE001 - the original error matters more
            metrics.print(
                f"could not save step {self.step} after {type(err).__name__} "
                f"({type(save_err).__name__}: {str(save_err).strip()[:160]})"
            )
            return
        name = type(err).__name__
        if path is not None:
            metrics.print(f"{name} after step {self.step}: saved {path}; rerun the same command to resume from it")
        elif self._updating:
            metrics.print(
                f"{name} inside the update of step {self.step + 1}: its weights are between two steps "
                f"and were not saved; the newest checkpoint is {self.saved_path}"
            )
        elif self.saved_path is not None:
            metrics.print(
                f"{name} in step {self.step + 1}: step {self.step} is saved in {self.saved_path}; rerun "
                "the same command to resume from it"
            )


def train(cfg: Config) -> dict:
    """Train as `cfg` says (one process, or this process's part of a launched job); returns the
    last validation metrics."""
    try:
        return Trainer(cfg).run()
    finally:
        shutdown()
