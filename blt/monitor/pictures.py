"""What a validation shows besides numbers: a snippet of validation text with a curve per byte
and the patch boundaries drawn on it, and generated samples.

The curve is what decided the boundaries where there is one (the patching mode names it: the entropy
model's next-byte entropy, the router's boundary probability); else the model's own next-byte
entropy, so the picture is informative for every patching mode.
"""

from __future__ import annotations

import numpy as np
import torch

from blt.generation import Generator
from blt.patching import entropy_from_logits, patch_ids_from_starts
from blt.tokens import OFFSET, decode


def _label(b: int) -> str:
    if b == 32:
        return "␣"
    if b == 10:
        return "⏎"
    return chr(b) if 33 <= b < 127 else "·"


@torch.no_grad()
def patch_snippet(model, patcher, ids: torch.Tensor) -> dict:
    """Entropies, patch starts and labels for one snippet `ids` (1, T), model forward included (every
    rank of a ZeRO-3 job must call this together)."""
    was_training = model.training
    model.eval()
    starts, signal = patcher.explain(model, ids)  # (1, T) bool, (1, T) or None
    if signal is not None:  # what decided the starts, as the patching mode describes it
        curve, label, threshold = signal, patcher.signal.label, patcher.signal.threshold
    else:
        logits = model(ids, patch_ids_from_starts(starts))
        curve, label, threshold = entropy_from_logits(logits.float()), "next-byte entropy (this model), nats", None
    if was_training:
        model.train()
    return {
        "bytes": [int(t) - OFFSET for t in ids[0].tolist()],
        "curve": curve[0].float().cpu().numpy(),
        "starts": starts[0].cpu().numpy(),
        "label": label,
        "threshold": threshold,
    }


def draw_patches(snip: dict, step: int) -> np.ndarray:
    """The snippet as an RGB image (H, W, 3) uint8: its curve, patch starts, the bytes below."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    H, starts, byte_values = snip["curve"], snip["starts"], snip["bytes"]
    T = len(byte_values)
    fig = Figure(figsize=(max(8.0, T * 0.11), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(T)
    ax.plot(x, H, color="#1f77b4", lw=1.2, marker=".", ms=3, label=snip["label"])
    for s in np.nonzero(starts)[0]:
        ax.axvline(s - 0.5, color="#d62728", lw=0.8, alpha=0.7)
    if snip["threshold"] is not None:
        ax.axhline(snip["threshold"], color="#7f7f7f", ls="--", lw=0.8, label=f"threshold {snip['threshold']:.2f}")
    ax.set_xticks(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a glyph the font lacks is drawn as a box, not an error
        ax.set_xticklabels([_label(b) if b >= 0 else "" for b in byte_values], fontsize=7, family="monospace")
    ax.set_xlim(-1, T)
    n_patches = int(starts.sum())
    ax.set_title(
        f"step {step}: {T} bytes in {n_patches} patches (mean {T / max(1, n_patches):.2f}); red lines start a patch",
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def snippet_ids(val_tokens: np.ndarray, length: int) -> torch.Tensor:
    """A fixed snippet of validation text: `length` ids starting after a newline a third of the way in."""
    n = len(val_tokens)
    start = n // 3
    window = np.asarray(val_tokens[start : start + 4 * length])
    newline = np.nonzero(window == 10 + OFFSET)[0]
    if len(newline):
        start += int(newline[0]) + 1
    ids = np.asarray(val_tokens[start : start + length], dtype=np.int64)
    return torch.from_numpy(ids)[None]


def sample_prompts(val_tokens: np.ndarray, count: int, length: int = 48) -> list[bytes]:
    """`count` fixed prompts from the validation text, each starting at a line."""
    n = len(val_tokens)
    prompts = []
    for i in range(count):
        ids = snippet_ids(val_tokens[(n * i) // max(1, count) :], length)[0].numpy()
        prompts.append(decode(ids)[:length])
    return prompts


def generate_samples(
    model, patcher, prompts: list[bytes], max_bytes: int, context: int, cached: bool = True
) -> list[list]:
    """Rows (prompt, output, settings): temperature 0.8, top-p 0.95, seed 0 (the same on every rank);
    cached=False for weights partitioned across ranks (see Generator)."""
    was_training = model.training
    outs = Generator(model, patcher, context, cached).generate(
        prompts, max_bytes=max_bytes, temperature=0.8, top_p=0.95, seed=0
    )
    rows = [
        [p.decode("utf-8", "replace"), o.decode("utf-8", "replace"), "temperature 0.8, top_p 0.95, seed 0"]
        for p, o in zip(prompts, outs)
    ]
    if was_training:
        model.train()
    return rows
