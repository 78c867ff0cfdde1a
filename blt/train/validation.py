"""Validation during training: bits per byte on the validation split (every rank scores its share),
then what rank 0 shows beside the numbers: the patch picture of a validation snippet and a few
generated samples (blt/monitor/pictures.py draws and generates; this module decides who runs what).

    validation = Validation(cfg, world, engine, patcher, [(name, val_tokens), ...])   # one per source
    result = validation.run(step, metrics)     # {"bpb": ..., "loss": ..., "bytes": ...}; logged as val_*

With several sources, each is scored on its own validation ids (eval.max_bytes each), logged as
val/bpb/<name>; val_bpb is then over all their bytes together.

Under ZeRO-3 (`engine.forwards_on_every_rank`) a forward needs every rank, so the ranks that log
nothing run the pictures' forwards with rank 0; partitioned weights (`engine.partitioned`)
generate uncached.
"""

from __future__ import annotations

import math

import numpy as np

from blt.config import Config
from blt.evaluate import evaluate
from blt.monitor.pictures import draw_patches, generate_samples, patch_snippet, sample_prompts, snippet_ids
from blt.patching import Patcher
from blt.train.distributed import Dist
from blt.train.metrics import MetricsLogger


def combine(results: list[dict]) -> dict:
    """Several evaluations as one over all their bytes (bits and patches add up)."""
    if len(results) == 1:
        return results[0]
    nbytes = sum(r["bytes"] for r in results)
    nats = sum(r["loss"] * r["bytes"] for r in results)
    patches = sum(r["bytes"] / r["avg_patch_size"] for r in results)
    return {
        "bpb": nats / nbytes / math.log(2),
        "loss": nats / nbytes,
        "bytes": nbytes,
        "avg_patch_size": nbytes / patches,
    }


class Validation:
    """The validation of one run: its config, ranks, engine (whose model is scored), patcher and
    validation tokens."""

    def __init__(self, cfg: Config, world: Dist, engine, patcher: Patcher, val: list[tuple[str, np.ndarray]]):
        self.cfg, self.world, self.engine, self.patcher, self.val = cfg, world, engine, patcher, val
        self.val_tokens = max(val, key=lambda v: len(v[1]))[1]  # the pictures' and samples' text

    def run(self, step: int, metrics: MetricsLogger) -> dict:
        """Validation BPB at `step` (all ranks share the work), logged; then the pictures."""
        c, w, engine = self.cfg, self.world, self.engine
        per_source = {
            name: evaluate(
                engine.model,
                self.patcher,
                tokens,
                c.data.seq_len,
                c.eval.batch_size,
                c.eval.max_bytes,
                engine.device,
                engine.amp_dtype,
                w.rank,
                w.world_size,
                w.all_sum,
            )
            for name, tokens in self.val
        }
        result = combine(list(per_source.values()))
        extra = {f"val/bpb/{name}": r["bpb"] for name, r in per_source.items()} if len(per_source) > 1 else {}
        metrics.log({"step": step, **{f"val_{k}": v for k, v in result.items()}, **extra})
        if metrics.enabled or engine.forwards_on_every_rank:  # the other ranks log nothing, but may be needed
            self.pictures(step, metrics)
        return result

    def pictures(self, step: int, metrics: MetricsLogger) -> None:
        """The patch image of a fixed validation snippet and generated samples, logged by rank 0
        (every rank of a ZeRO-3 job runs the same forwards)."""
        c, engine, model = self.cfg, self.engine, self.engine.model
        if c.logging.images:
            ids = snippet_ids(self.val_tokens, min(160, c.data.seq_len)).to(engine.device)  # (1, T) bytes
            snip = patch_snippet(model, self.patcher, ids)
            if metrics.enabled:
                metrics.image(
                    step,
                    "patches",
                    draw_patches(snip, step),
                    f"{len(snip['bytes'])} validation bytes, {int(snip['starts'].sum())} patches",
                )
        if c.logging.samples > 0:
            rows = generate_samples(
                model,
                self.patcher,
                sample_prompts(self.val_tokens, c.logging.samples),
                c.logging.sample_bytes,
                c.data.seq_len,
                cached=not engine.partitioned,
            )
            metrics.table(step, "samples", ["prompt", "output", "settings"], rows)
