"""What a patching mode is: the rule that cuts a whole sequence, the same rule one byte at a time,
and what the rest of blt needs to know about it (config checks, FLOPs, HF export, calibration,
its extra training loss and metrics, what its per-byte signal means for pictures and `blt patch`).
Each mode is one module (static.py, space.py, entropy.py, learned.py) holding one subclass, listed once in
registry.py. `cfg` is the `patching` section of the config (blt.config.PatchingConfig).

The rules every mode shares (a BOS starts a patch, `split_first_byte`, `max_patch_length`) are
applied around a mode's own rule by registry.patch_starts and streaming.StreamingStarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Signal:
    """What the per-byte signal that decided the starts (Patcher.explain) is, for the reader."""

    key: str  # its name in `blt patch --json`
    label: str  # the label of its curve in a patch picture
    threshold: float | None  # where the rule cuts it (a dashed line in the picture), if it has one
    rule: str  # the rule in a few words for `blt patch` ("" when there is nothing to say)


class Mode:
    name = ""
    needs_entropies = False  # the rule reads the entropy model's next-byte entropies
    needs_router = False  # the rule reads the model's own boundary probabilities (the model cuts its patches)
    start_reads_its_byte = False  # whether byte t starts a patch depends on byte t itself (space)

    def check(self, cfg, arch: str) -> str | None:
        """What is wrong with `cfg` for this mode (one line naming the key and the fix), or None."""
        return None

    def starts(self, tokens: torch.Tensor, cfg, signal: torch.Tensor | None, threshold: float | None) -> torch.Tensor:
        """(B, T) byte ids -> (B, T) bool, True where this mode's rule starts a patch. `signal` (B, T) is
        the per-byte number the rule reads: entropies (entropy) or the router's probabilities (learned)."""
        raise NotImplementedError

    def stream(self, cfg, threshold: float | None) -> StreamRule:
        """A fresh per-row rule that decides byte by byte what `starts` decides for the whole row."""
        raise NotImplementedError

    def assumed_patch_size(self, cfg) -> float:
        """The mean patch size (bytes) FLOPs are reported for before any data is seen."""
        raise NotImplementedError

    def calibrate(self, cfg, tokens: torch.Tensor, entropies: torch.Tensor | None) -> float | None:
        """The threshold this mode derives from sample data (None: it needs none)."""
        return None

    def describe(self, cfg) -> str:
        """A few words for a model card: the mode and its settings."""
        return self.name

    def hf_refusal(self, cfg) -> tuple[str, str] | None:
        """(key, why) when HF transformers' BltPatcher cannot express this mode, else None."""
        return None

    def signal(self, cfg, threshold: float | None) -> Signal:
        """What Patcher.explain's signal is: here the entropy model's next-byte entropies (a patcher
        with an entropy model explains by them, whatever the mode)."""
        rule = f"threshold {threshold:.3f}" if threshold is not None else ""
        return Signal("entropies", "next-byte entropy (entropy model), nats", threshold, rule)

    def training_terms(self, cfg, routing, inputs: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """For one training micro-batch of `inputs` (B, T), with the model's Routing (None without a
        router): this mode's extra loss, weighted and with gradient (None: none), and its metrics
        {name: value without gradient}, which metrics.jsonl logs as means over micro-batches and ranks."""
        return None, {}


class StreamRule:
    """One row's state for Mode.stream: `push(t, token, signal)` says whether byte `t` (> 0) starts
    a patch by the mode's own rule; `signal` is the byte's value of Mode.starts' signal: H of
    predicting this byte (entropy), or the router's probability (learned)."""

    def push(self, t: int, token: int, signal: float | None) -> bool:
        raise NotImplementedError
