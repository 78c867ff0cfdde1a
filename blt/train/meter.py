"""The numbers of the steps between two log lines: loss and bits per byte, throughput in bytes and
patches per second, model FLOP utilisation (at the mean patch size measured in the interval), the
step time split into data / forward+backward / optimizer, the histogram of patch sizes, and the
mean of every other named per-step mean it is given (a patching mode's metrics, such as learned
patching's ratio_loss, boundary_rate and router_prob)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np


class StepMeter:
    """Sums since the last log line (this rank's timings; named means, bytes and patches over all ranks)."""

    def __init__(self, flops_at: Callable[[float], float], peak_flops: float, world_size: int):
        """flops_at(mean patch size) -> training FLOPs per byte."""
        self.flops_at, self.peak_flops, self.world_size = flops_at, peak_flops, world_size
        self.hist = np.zeros(1, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Start a new log interval (its clock too)."""
        self.t0 = time.time()
        self.steps, self.bytes, self.patches = 0, 0, 0
        self.means = {"loss": 0.0}  # name -> sum over the interval's steps of each step's mean
        self.times = {"data": 0.0, "fwd_bwd": 0.0, "optimizer": 0.0}
        self.hist[:] = 0

    def add_step(self, means: dict[str, float], nbytes: float, npatches: float, times: dict) -> None:
        """One optimizer step: its named means over micro-batches and ranks ("loss" and any other),
        its bytes and patches over all ranks, this rank's timings."""
        self.steps += 1
        for key, value in means.items():
            self.means[key] = self.means.get(key, 0.0) + value
        self.bytes += nbytes
        self.patches += npatches
        for key, value in times.items():
            self.times[key] += value

    def add_patch_lengths(self, lengths: np.ndarray) -> None:
        """Count patches of each length (bytes) into the histogram, growing it as needed."""
        counts = np.bincount(lengths)
        if len(counts) > len(self.hist):
            self.hist = np.concatenate([self.hist, np.zeros(len(counts) - len(self.hist), dtype=np.int64)])
        self.hist[: len(counts)] += counts

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (validation, pictures) out of the throughput."""
        self.t0 += seconds

    def record(self, step: int, lr: float, grad_norm: float) -> dict:
        """The metrics.jsonl record of this interval: means per step, rates per second."""
        dt = max(time.time() - self.t0, 1e-9)
        n = max(1, self.steps)
        means = {key: value / n for key, value in self.means.items()}
        mean = means.pop("loss")
        bytes_per_s = self.bytes / dt
        patch_size = self.bytes / max(1, self.patches)
        achieved = self.flops_at(patch_size) * bytes_per_s  # all ranks together
        return {
            "step": step,
            "loss": mean,
            "bpb": mean / math.log(2),
            "lr": lr,
            "grad_norm": grad_norm,
            "bytes_per_s": bytes_per_s,
            "patches_per_s": self.patches / dt,
            "avg_patch_size": patch_size,
            "tflops": achieved / 1e12,
            "mfu": achieved / (self.peak_flops * self.world_size),
            "step_time_s": dt / n,
            **{f"time_{k}_s": v / n for k, v in self.times.items()},
            **means,  # a patching mode's metrics, after the rest
        }
