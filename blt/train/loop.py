"""The training loop: data -> patches -> model -> loss -> engine, with validation in bits per
byte, checkpoints, resume, metrics.jsonl and a progress bar.

    blt train configs/tiny.yaml training.steps=200

SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) finishes the current step, saves a
checkpoint and exits; `checkpoint.resume=auto` (the default) continues from it. A second Ctrl-C
stops at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blt.config import Config, ConfigError, PatchingConfig, config_to_dict, dump_config
from blt.data import PAD_ID, ByteLoader, prepare_data, read_tokens
from blt.entropy import EntropyCache, Patcher
from blt.errors import UserError
from blt.evaluate import evaluate
from blt.model import build_model
from blt.model.flops import assumed_patch_size, flops_report
from blt.monitor.peak import peak_flops
from blt.train.checkpoint import CheckpointError, checkpoint_config, find_checkpoint, has_checkpoints
from blt.train.distributed import (Dist, PeerLostError, choose_engine, init_distributed, is_peer_failure,
                                   launched_world, shutdown)
from blt.train.engine import LocalEngine
from blt.train.recompute import apply_activation_checkpointing
from blt.train.meter import StepMeter, patch_lengths
from blt.train.metrics import MetricsLogger
from blt.train.optim import lr_at


class RunDirError(UserError):
    """The run directory cannot be used as asked; one-line message."""


def log(text: str) -> None:
    """Progress messages go to stderr (stdout is kept for results), from rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)


def resolve_device(cfg: Config, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    """The device of this process (GPU number local_rank) and the autocast dtype (None = fp32)."""
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but no CUDA device is visible (use training.device=cpu)")
    dev = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    dtype = cfg.training.dtype
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)


def cpu_threads(cfg: Config, world: Dist) -> int:
    """training.threads, else OMP_NUM_THREADS, else this machine's cores shared by its processes."""
    if cfg.training.threads:
        return cfg.training.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, world.local_world_size))


def prepare_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """Create/check the run dir; returns (run_dir, checkpoint to resume from or None).
    Never overwrites a run that has checkpoints unless resuming it."""
    run_dir = cfg.resolved_run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run directory '{run_dir}' is not writable ({e.strerror}); set run_dir=PATH") from None
    resume = cfg.checkpoint.resume
    has_ckpt = has_checkpoints(run_dir)
    if resume == "none":
        if has_ckpt:
            raise RunDirError(
                f"run directory '{run_dir}' already holds checkpoints; continue it with checkpoint.resume=auto "
                "or pick a new run_dir=PATH (nothing was overwritten)"
            )
        return run_dir, None
    if resume == "auto":
        return run_dir, (find_checkpoint(run_dir) if has_ckpt else None)
    return run_dir, find_checkpoint(resume)


def check_resumable(cfg: Config, step_dir: Path) -> None:
    """The model config must be the one the checkpoint was trained with."""
    saved, now = config_to_dict(checkpoint_config(step_dir).model), config_to_dict(cfg.model)
    for key in saved:
        if key == "hash_sparse_grad":  # how gradients are stored, not what the weights are
            continue
        if saved[key] != now[key]:
            raise CheckpointError(
                f"checkpoint '{step_dir}' was trained with model.{key}={saved[key]!r} but the config says "
                f"{now[key]!r}; use the same model config or a new run_dir"
            )


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over non-padding targets."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)


def build_patcher(cfg: Config, device) -> Patcher:
    if cfg.model.arch == "byte_lm":  # a byte LM is a BLT whose patches are single bytes
        return Patcher(PatchingConfig(mode="static", patch_size=1, max_patch_length=None))
    return Patcher.from_config(cfg.patching, device)


def init_weights_from(model, source: str) -> None:
    """Fine-tuning: copy the weights of a run, checkpoint or export into `model` (same architecture)."""
    from blt.train.checkpoint import load_model_from_checkpoint

    src, _, where = load_model_from_checkpoint(source, "cpu")
    try:
        model.load_state_dict(src.state_dict())
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise ConfigError(f"training.init_from '{where}' does not fit this model config "
                          f"(use the model section of its config.yaml): {detail[:200]}") from None


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
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.world = world = launched_world()
        self.engine_kind = choose_engine(cfg, world)
        torch.set_num_threads(cpu_threads(cfg, world))
        self.device, self.amp_dtype = resolve_device(cfg, world.local_rank)
        if self.engine_kind == "accelerate":
            from blt.train.deepspeed_engine import accelerate_overrides

            for change in accelerate_overrides(cfg):
                log(f"distributed.{change} (from the accelerate config)")
        if self.engine_kind != "local":
            if cfg.model.hash_sparse_grad:  # ZeRO shards dense gradients only; the weights are the same
                log("model.hash_sparse_grad=false under DeepSpeed (ZeRO shards dense gradients only)")
                cfg.model.hash_sparse_grad = False
            init_distributed(cfg, world, self.device)
        self.run_dir, resume_from = world.on_main_first(lambda: prepare_run_dir(cfg), share=True)
        if resume_from is not None:
            check_resumable(cfg, resume_from)

        self.data = world.on_main_first(lambda: prepare_data(cfg.data, log=log))
        train_tokens, self.val_tokens = read_tokens(self.data.train), read_tokens(self.data.val)
        self.loader = ByteLoader(train_tokens, cfg.data.seq_len, cfg.training.batch_size, cfg.data.seed,
                                 world.rank, world.world_size)
        self.patcher = build_patcher(cfg, self.device)
        self.entropy_cache = None
        entropy = cfg.model.arch == "blt" and cfg.patching.mode == "entropy"
        if entropy and cfg.patching.entropy_cache:
            self.entropy_cache = world.on_main_first(lambda: EntropyCache.build(
                self.patcher, train_tokens, cfg.data.seq_len, self.data.dir, log=log))

        torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model).to(self.device)
        if cfg.training.init_from and resume_from is None:
            init_weights_from(self.model, cfg.training.init_from)
            log(f"weights from {cfg.training.init_from} (training.init_from)")
        info = model_info(cfg, self.model, self.patcher, self.data)  # before ZeRO-3 partitions the weights
        if cfg.training.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if world.world_size > 1:
            torch.manual_seed(cfg.training.seed + 1 + world.rank)  # distinct dropout masks per rank
        if self.engine_kind == "local":
            self.engine = LocalEngine(self.model, cfg, self.device, self.amp_dtype)
        else:
            from blt.train.deepspeed_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(self.model, cfg, self.device, world, self.engine_kind == "accelerate")
            self.model, self.amp_dtype = self.engine.model, self.engine.amp_dtype
        self.step, self.state = 0, {}
        if resume_from is not None:
            self.state = self.engine.load(resume_from)
            self.loader.load_state_dict(self.state["data"])
            self.step = self.state["step"]
            self.patcher.threshold = self.state.get("threshold", self.patcher.threshold)
            log(f"resumed from {resume_from} at step {self.step}")
        elif entropy and self.patcher.threshold is None:
            sample = ByteLoader(train_tokens, cfg.data.seq_len, min(16, self.loader.num_windows), cfg.data.seed + 1)
            th = self.patcher.calibrate(next(sample)[:, :-1])
            log(f"entropy threshold {th:.4f} nats gives mean patch size {cfg.patching.target_patch_size} bytes")
        if entropy:  # the resolved config records the threshold used and where the entropy model is
            cfg.patching.threshold = self.patcher.threshold
            cfg.patching.entropy_model = str(Path(cfg.patching.entropy_model).resolve())
        self.trace = DataTrace(self.run_dir, world.rank, self.step) if cfg.logging.data_trace else None
        peak, peak_source = peak_flops(self.device, self.amp_dtype) if world.is_main else (1.0, "")
        self.meter = StepMeter(info["flops_per_byte"], peak, world.world_size)
        if world.is_main:
            info.update(peak_flops_per_device=peak, peak_flops_source=peak_source)
            dump_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "model_info.json").write_text(json.dumps(info, indent=1))
        where = f"{world.world_size} process{'es' if world.world_size > 1 else ''}, {self.engine_kind}" + (
            f" ZeRO-{cfg.distributed.zero_stage}" if self.engine_kind != "local" else "")
        log(f"{cfg.model.arch}: {info['params']:,} params ({info['params_non_embedding']:,} non-embedding), "
            f"{info['flops_per_byte']:.3g} train FLOPs/byte ({info['flops_per_byte_with_entropy']:.3g} with the "
            f"entropy model), {self.data.train.num_tokens:,} train / {self.data.val.num_tokens:,} val bytes, "
            f"{where} -> {self.run_dir}")

    def train_step(self, lr: float) -> dict:
        """One optimizer step over grad_accum micro-batches; returns this rank's sums for the metrics."""
        loss_sum, nbytes, npatches, windows = 0.0, 0, 0, []
        times = {"data": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0}
        for _ in range(self.cfg.training.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.loader)
            windows += self.loader.last_indices
            inputs, targets = batch[:, :-1].to(self.device), batch[:, 1:].to(self.device)  # (B, T) bytes
            ent = None
            if self.entropy_cache is not None:
                ent = self.entropy_cache.windows(self.loader.last_indices).to(self.device)
            patch_ids = self.patcher(inputs, ent)  # (B, T)
            t1 = time.perf_counter()
            loss = lm_loss(self.engine.forward(inputs, patch_ids), targets)
            self.engine.backward(loss)
            loss_sum += float(loss.detach())  # waits for the device: the timing below is honest
            times["data"] += t1 - t0
            times["fwd_bwd"] += time.perf_counter() - t1
            nbytes += inputs.numel()
            npatches += int(patch_ids[:, -1].sum()) + len(patch_ids)
            self.meter.add_patch_lengths(patch_lengths(patch_ids))
        t2 = time.perf_counter()
        grad_norm = self.engine.step(lr)
        times["optimizer"] = time.perf_counter() - t2
        if self.trace is not None:
            self.trace.write(self.step + 1, windows)
        return {"loss_sum": loss_sum, "grad_norm": grad_norm, "bytes": nbytes, "patches": npatches, "times": times}

    def validate(self, metrics: MetricsLogger) -> dict:
        """Validation BPB (all ranks share the work), then the pictures: the patch image and samples
        (rank 0 makes them; under ZeRO-3 the other ranks run the same forwards with it)."""
        c, w = self.cfg, self.world
        result = evaluate(self.model, self.patcher, self.val_tokens, c.data.seq_len, c.eval.batch_size,
                          c.eval.max_bytes, self.device, self.amp_dtype, w.rank, w.world_size, w.all_sum)
        metrics.log({"step": self.step, **{f"val_{k}": v for k, v in result.items()}})
        # ranks other than 0 log nothing, but under ZeRO-3 every forward needs all of them
        if not (metrics.enabled or (self.engine_kind != "local" and c.distributed.zero_stage == 3)):
            return result
        if c.logging.images:
            from blt.monitor.pictures import draw_patches, patch_snippet, snippet_ids

            ids = snippet_ids(self.val_tokens, min(160, c.data.seq_len)).to(self.device)
            snip = patch_snippet(self.model, self.patcher, ids)
            if metrics.enabled:
                metrics.image(self.step, "patches", draw_patches(snip, self.step),
                              f"{len(snip['bytes'])} validation bytes, {int(snip['starts'].sum())} patches")
        if c.logging.samples > 0:
            from blt.monitor.pictures import generate_samples, sample_prompts

            rows = generate_samples(self.model, self.patcher, sample_prompts(self.val_tokens, c.logging.samples),
                                    c.logging.sample_bytes, c.data.seq_len, self.device)
            metrics.table(self.step, "samples", ["prompt", "output", "settings"], rows)
        return result

    def save(self, last_val: dict, elapsed: float) -> Path:
        return self.engine.save(self.run_dir, self.step, {
            "data": self.loader.state_dict(), "threshold": self.patcher.threshold, "last_val": last_val,
            "elapsed": elapsed,
        })

    def run(self) -> dict:
        """Train to training.steps (or max_minutes, or a stop signal); returns the last validation."""
        try:
            return self._run()
        except Exception as e:
            if self.world.world_size > 1 and is_peer_failure(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # drop gloo's "[file.cc:537]" prefix
                raise PeerLostError(
                    f"rank {self.world.rank} lost another process of the job at step {self.step} ({first}); "
                    f"rerun the same command to resume from the newest complete checkpoint in "
                    f"{self.run_dir / 'checkpoints'}") from None
            raise

    def _run(self) -> dict:
        c, world = self.cfg, self.world
        metrics = MetricsLogger(self.run_dir, c.training.steps, self.step, c.logging.progress and world.is_main,
                                enabled=world.is_main, cfg=c, resumed=self.step > 0)
        last_val: dict = self.state.get("last_val", {})
        t0, before = time.time(), self.state.get("elapsed", 0.0)
        self.meter.reset()  # sums since the last log line, over all ranks
        try:
            with StopRequest() as stop:
                while self.step < c.training.steps:
                    lr = lr_at(self.step, c.training.steps, c.optimizer.lr, c.schedule)
                    out = self.train_step(lr)
                    self.step += 1
                    timed_out = (c.training.max_minutes is not None
                                 and before + time.time() - t0 > 60 * c.training.max_minutes)
                    # one collective: metric sums, and whether any rank was told to stop (all stop together)
                    loss_sum, nbytes, npatches, stops, timeouts = world.all_sum(
                        [out["loss_sum"], out["bytes"], out["patches"], stop.reason is not None, timed_out])
                    loss = loss_sum / (c.training.grad_accum * world.world_size)
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"loss became {loss} at step {self.step}; lower optimizer.lr")
                    stop_reason = (stop.reason or "SIGTERM") if stops else None
                    timed_out = timeouts > 0
                    metrics.advance()
                    self.meter.add_step(loss, nbytes, npatches, out["times"])
                    if self.step % c.logging.every == 0 or self.step == c.training.steps:
                        record = self.meter.record(self.step, lr, out["grad_norm"])
                        metrics.log({**record, "peak_mem_gb": peak_memory_gb(self.device),
                                     "elapsed": before + time.time() - t0})
                        metrics.histogram(self.step, "patch_size", self.meter.hist.tolist())
                        self.meter.reset()
                    last = self.step == c.training.steps or timed_out or stop_reason is not None
                    if (last and stop_reason is None) or (c.eval.every and self.step % c.eval.every == 0):
                        t_eval = time.time()
                        last_val = self.validate(metrics)
                        self.meter.exclude(time.time() - t_eval)
                    if last or self.step % c.checkpoint.every == 0:
                        path = self.save(last_val, before + time.time() - t0)
                    if timed_out:
                        metrics.print(f"stopping at step {self.step}: training.max_minutes={c.training.max_minutes}")
                        break
                    if stop_reason is not None:
                        metrics.print(f"{stop_reason}: saved {path}; run the same command to resume")
                        break
        finally:
            metrics.close()
            if self.trace is not None:
                self.trace.close()
        return {"step": self.step, **last_val}


class DataTrace:
    """logging.data_trace: each rank appends `{"step", "windows"}` per optimizer step to
    run_dir/data_trace/rank_<r>.jsonl; a resume first drops the lines after its checkpoint, so the
    file always lists exactly the windows the current weights were trained on, in order."""

    def __init__(self, run_dir: Path, rank: int, resumed_step: int):
        path = Path(run_dir) / "data_trace" / f"rank_{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resumed_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.file = path.open("a")

    def write(self, step: int, windows: list[int]) -> None:
        self.file.write(json.dumps({"step": step, "windows": [int(w) for w in windows]}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(cfg: Config) -> dict:
    """Train as `cfg` says (one process, or this process's part of a launched job); returns the
    last validation metrics."""
    try:
        return Trainer(cfg).run()
    finally:
        shutdown()


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory so far: GPU memory allocated by torch, or CPU resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KB


def model_info(cfg: Config, model, patcher: Patcher, data) -> dict:
    params = sum(p.numel() for p in model.parameters())
    patch_size = assumed_patch_size(cfg.model, cfg.patching)
    ecfg = patcher.model.cfg if patcher.model is not None else None
    rep = flops_report(cfg.model, cfg.data.seq_len, patch_size, params, ecfg)
    return {"arch": cfg.model.arch, "assumed_patch_size": patch_size, **rep.__dict__,
            "train_bytes": data.train.num_tokens, "val_bytes": data.val.num_tokens}
