"""Tiny random BLTs for the generation and scoring tests (tests/unit/test_generate.py,
tests/unit/test_scoring.py, tests/e2e/test_harness.py): `random_blt` and `random_scorer`."""

from __future__ import annotations

import torch

from blt.config import config_from_dict
from blt.harness.scoring import Scorer
from blt.model import build_model
from blt.patching import Patcher

# a large init spreads the logits, so greedy choices are clear-cut
BLT = {
    "encoder": {"dim": 32, "layers": 1, "heads": 2, "window": 8},
    "global_model": {"dim": 64, "layers": 2, "heads": 2},
    "decoder": {"dim": 32, "layers": 2, "heads": 2, "window": 8},
    "cross_attn_k": 2,
    "cross_attn_heads": 2,
    "hash_ngram_sizes": [3, 4],
    "hash_buckets": 64,
    "init_std": 0.3,
}


def grouped(kv_heads: int | None, position: str = "rope") -> dict:
    """Every Transformer section of BLT with 4 query heads sharing `kv_heads` key/value heads (None: as
    BLT), positions given by `position` (rope, alibi or none)."""
    sections = ("encoder", "global_model", "decoder")
    out = {k: {**BLT[k], "position": position} for k in sections}
    if kv_heads is None:
        return out
    return {k: {**out[k], "heads": 4, "kv_heads": kv_heads} for k in sections}


def random_blt(
    mode: str,
    hf: bool = False,
    all_layers: bool = False,
    seed: int = 0,
    kv_heads: int | None = None,
    position: str = "rope",
):
    """A random tiny BLT in patching `mode` and its Patcher (with a random entropy model for entropy);
    kv_heads: grouped-query attention (4 heads) in every section and the entropy model; position:
    every section's and the entropy model's."""
    torch.manual_seed(seed)
    lm = {"dim": 32, "layers": 2, "heads": 2} if kv_heads is None else {"dim": 32, "layers": 2, "heads": 4}
    lm["position"] = position
    if kv_heads is not None:
        lm["kv_heads"] = kv_heads
    lm = build_model(config_from_dict({"model": {"arch": "byte_lm", "lm": lm, "init_std": 0.3}}).model).eval()
    cfg = config_from_dict(
        {
            "model": {
                **BLT,
                **grouped(kv_heads, position),
                "hf_compat": hf,
                "cross_attn_all_layers_decoder": all_layers,
            },
            "patching": {
                "mode": mode,
                "patch_size": 3,
                "max_patch_length": 6,
                "threshold": None if mode == "learned" else 4.0,
                "split_first_byte": hf,
                "entropy_model": "unused",
            },
        }
    )
    model = build_model(cfg.model, cfg.patching).eval()
    return model, Patcher(cfg.patching, lm if mode == "entropy" else None)


def random_scorer(mode: str, hf: bool = False, batch_size: int = 16, context: int = 96) -> Scorer:
    return Scorer(*random_blt(mode, hf), context, batch_size)
