"""The runtime patcher: byte ids -> patch ids under a patching config, running the frozen entropy
model (a `byte_lm`) for modes that read entropies. It loads nothing itself: blt/artifacts builds
one from a config, with its entropy model (`build_patcher`).

    patcher = Patcher(cfg.patching, entropy_model)
    patcher.calibrate(sample_tokens)      # a mode with a data-derived threshold and threshold=None
    ids = patcher(tokens)                 # (B, T) -> (B, T) patch index of every byte
    logits, ids, routing = patcher.forward(model, tokens)   # every mode, learned included
    extra, metrics = patcher.training_terms(routing, tokens)  # the mode's extra loss and metrics
    starts, signal = patcher.explain_windows(model, ids, 1024)   # (T,) any length, for `blt patch`
    about = patcher.signal                # what that signal is: its key, label, threshold and rule

With learned patching the model's own router cuts the patches inside its forward, so `patcher(...)`
and `starts` refuse; `forward` runs the model either way.
"""

from __future__ import annotations

import torch

from blt.patching.base import Signal
from blt.patching.registry import mode_of, patch_starts
from blt.patching.rules import entropy_from_logits, patch_ids_from_starts


class Patcher:
    def __init__(self, cfg, entropy_model=None, entropy_source: str = ""):
        self.cfg = cfg
        self.mode = mode_of(cfg)
        self.model = entropy_model
        self.source = entropy_source  # identifies the entropy model (for cache keys)
        self.threshold = cfg.threshold
        self.learned = self.mode.needs_router  # the model cuts its own patches (read within blt/patching)

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """(B, T) ids -> (B, T) float32 entropies (nats) of the entropy model's next-byte prediction."""
        if self.model is None:
            raise ValueError("entropies need an entropy model (patching.mode=entropy)")
        dev = next(self.model.parameters()).device
        outs = [entropy_from_logits(self.model(tokens[i : i + chunk].to(dev))) for i in range(0, len(tokens), chunk)]
        return torch.cat(outs).to(tokens.device)

    def starts(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        if self.learned:
            raise ValueError(
                "learned patching: the model's router cuts the patches; use patcher.forward(model, tokens)"
            )
        if self.mode.needs_entropies and entropies is None:
            entropies = self.entropies(tokens)
        return patch_starts(tokens, self.cfg, entropies, self.threshold)

    def __call__(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        return patch_ids_from_starts(self.starts(tokens, entropies))

    def cut(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, T) patch ids decided before the model runs, or None where the model's router cuts them."""
        return None if self.learned else self(tokens, entropies)

    def forward(
        self,
        model,
        tokens: torch.Tensor,
        entropies: torch.Tensor | None = None,
        patch_ids: torch.Tensor | None = None,
    ):
        """Run `model(tokens, patch_ids, routing=True)` (a model, or an engine's forward) on `tokens`
        (B, T) cut by this patcher (or given `patch_ids` from `cut`), or by the model's router
        (learned) -> (logits (B, T, V), patch ids (B, T), Routing or None)."""
        if patch_ids is None:
            patch_ids = self.cut(tokens, entropies)
        logits, routing = model(tokens, patch_ids, routing=True)
        return logits, patch_ids if routing is None else routing.patch_ids, routing

    def training_terms(self, routing, inputs: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """The mode's extra loss (weighted, with gradient, or None) and metrics {name: value} for one
        training micro-batch `inputs` (B, T) that `forward` gave `routing` for (base.Mode.training_terms)."""
        return self.mode.training_terms(self.cfg, routing, inputs)

    @property
    def signal(self) -> Signal:
        """What `explain`'s per-byte signal is: its `blt patch` key, picture label, threshold and rule."""
        return self.mode.signal(self.cfg, self.threshold)

    @torch.no_grad()
    def explain(self, model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For pictures and `blt patch`: (B, T) starts and the per-byte signal that decided them,
        entropies (entropy), the router's boundary probabilities (learned) or None."""
        if self.learned:
            _, routing = model(tokens, None, routing=True)
            return routing.starts, routing.probs.float()
        ent = self.entropies(tokens) if self.model is not None else None
        return self.starts(tokens, ent), ent

    @torch.no_grad()
    def explain_windows(
        self, model, ids: torch.Tensor, window: int, batch_bytes: int = 16384
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`explain` for one sequence (T,) of any length, cut into windows of `window` bytes as training
        cuts its data (each window starts a patch), about `batch_bytes` per forward (memory stays that
        of one such batch, whatever T) -> (T,) starts and (T,) signal (or None)."""
        full = len(ids) // window * window
        rows = ids[:full].view(-1, window)  # (N, window)
        batch = max(1, batch_bytes // window)
        pieces = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        if full < len(ids):
            pieces.append(ids[full:][None])  # (1, T - full) the last, shorter window
        found = [self.explain(model, x) for x in pieces]
        starts = torch.cat([s.flatten() for s, _ in found])
        signal = None if found[0][1] is None else torch.cat([e.flatten() for _, e in found])
        return starts, signal

    def calibrate(self, tokens: torch.Tensor) -> float | None:
        """A mode whose threshold comes from data, with none set: choose it on `tokens` (B, T) (for
        entropy patching: the mean patch size becomes cfg.target_patch_size). Returns the threshold."""
        if self.threshold is None and self.mode.needs_entropies:
            self.threshold = self.mode.calibrate(self.cfg, tokens, self.entropies(tokens))
        return self.threshold
