"""The runtime side of patching: a Patcher turns byte ids into patch ids, running the frozen
entropy model (a `byte_lm` checkpoint) when patching is entropy-based, and caching entropies of a
whole packed split when asked.

    patcher = Patcher.from_config(cfg.patching, device)
    patcher.calibrate(sample_tokens)      # entropy mode with threshold=None: pick th for the target size
    ids = patcher(tokens)                 # (B, T) -> (B, T) patch index of every byte
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from blt.config import ConfigError, PatchingConfig
from blt.patching import (
    entropy_from_logits,
    patch_ids_from_starts,
    patch_starts,
    threshold_for_patch_size,
)


class Patcher:
    def __init__(self, cfg: PatchingConfig, entropy_model=None, entropy_source: str = ""):
        self.cfg = cfg
        self.model = entropy_model
        self.source = entropy_source  # identifies the entropy model (for cache keys)
        self.threshold = cfg.threshold

    @classmethod
    def from_config(cls, cfg: PatchingConfig, device: str | torch.device = "cpu") -> "Patcher":
        if cfg.mode != "entropy":
            return cls(cfg)
        from blt.train.checkpoint import CheckpointError, load_model_from_checkpoint

        if not cfg.entropy_model:
            raise ConfigError("patching.mode=entropy needs patching.entropy_model (a run dir of a byte_lm)")
        try:
            model, ecfg, step_dir = load_model_from_checkpoint(cfg.entropy_model, device)
        except CheckpointError as e:
            raise ConfigError(
                f"patching.entropy_model: {e} (train one with `blt train configs/entropy_tiny.yaml`)"
            ) from None
        if ecfg.model.arch != "byte_lm":
            raise ConfigError(f"patching.entropy_model '{cfg.entropy_model}' is a {ecfg.model.arch} model; it must be a byte_lm")
        for p in model.parameters():
            p.requires_grad_(False)
        weights = step_dir / "model.safetensors"  # a ZeRO-3 checkpoint has only shards (and state.json)
        st = (weights if weights.is_file() else step_dir / "state.json").stat()
        return cls(cfg, model, f"{step_dir.resolve()}:{st.st_size}:{st.st_mtime_ns}")

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """(B, T) ids -> (B, T) float32 entropies (nats) of the entropy model's next-byte prediction."""
        if self.model is None:
            raise ValueError("entropies need an entropy model (patching.mode=entropy)")
        dev = next(self.model.parameters()).device
        outs = [entropy_from_logits(self.model(tokens[i : i + chunk].to(dev))) for i in range(0, len(tokens), chunk)]
        return torch.cat(outs).to(tokens.device)

    def starts(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.mode == "entropy" and entropies is None:
            entropies = self.entropies(tokens)
        return patch_starts(tokens, self.cfg, entropies, self.threshold)

    def __call__(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        return patch_ids_from_starts(self.starts(tokens, entropies))

    def calibrate(self, tokens: torch.Tensor) -> float | None:
        """Entropy mode without a threshold: choose it so the mean patch size on `tokens` (B, T)
        is cfg.target_patch_size. Returns the threshold (None for other modes)."""
        if self.cfg.mode != "entropy":
            return None
        if self.threshold is None:
            H = self.entropies(tokens)
            self.threshold = threshold_for_patch_size(
                H, self.cfg.target_patch_size, self.cfg.threshold_mode, self.cfg.max_patch_length, tokens
            )
        return self.threshold


class EntropyCache:
    """Entropies of a whole packed split, computed once in windows aligned with the training
    windows (window i covers stream positions [i*L, i*L + L)), kept as a float32 memmap."""

    def __init__(self, path: Path, seq_len: int):
        self.seq_len = seq_len
        self.values = np.memmap(path, dtype=np.float32, mode="r")

    @classmethod
    def build(cls, patcher: Patcher, tokens: np.ndarray, seq_len: int, out_dir: Path, batch: int = 16, log=print):
        key = hashlib.sha256(f"{patcher.source}|{seq_len}|{len(tokens)}".encode()).hexdigest()[:16]
        path = Path(out_dir) / f"entropies-{key}.f32"
        if not path.exists():
            n = len(tokens)
            windows = (n + seq_len - 1) // seq_len
            log(f"caching entropies for {n:,} bytes in {windows} windows -> {path}")
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(n,))
            for w0 in range(0, windows, batch):
                rows = []
                for w in range(w0, min(windows, w0 + batch)):
                    row = np.zeros(seq_len, dtype=np.int64)
                    chunk = tokens[w * seq_len : (w + 1) * seq_len]
                    row[: len(chunk)] = chunk
                    rows.append(row)
                H = patcher.entropies(torch.from_numpy(np.stack(rows))).numpy()  # (b, L)
                for j, w in enumerate(range(w0, min(windows, w0 + batch))):
                    m = min(seq_len, n - w * seq_len)
                    out[w * seq_len : w * seq_len + m] = H[j, :m]
            out.flush()
            del out
            os.replace(tmp, path)
        return cls(path, seq_len)

    def windows(self, indices: list[int]) -> torch.Tensor:
        """Entropies (B, L) of the inputs of training windows `indices`."""
        L = self.seq_len
        return torch.from_numpy(np.stack([np.asarray(self.values[i * L : i * L + L]) for i in indices]))
