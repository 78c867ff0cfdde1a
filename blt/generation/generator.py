"""Sampling bytes from a trained BLT (or byte LM), with KV caches or by full recomputation.

    blt generate runs/tiny --prompt "ROMEO." --max-bytes 200 --temperature 0.8 --top-p 0.9 --seed 0
    blt generate exports/tiny --prompt "To be" --prompt "KING" --stop "\\n\\n" --temperature 0

    from blt.generation import Generator
    gen = Generator.load("exports/tiny")
    texts = gen.generate(["ROMEO.", "JULIET."], max_bytes=100, temperature=0.8, seed=0)   # list[bytes]
    for row, byte in gen.stream(["ROMEO."], max_bytes=100): ...

Prompts and stop strings are str (UTF-8; surrogate escapes, as argv arrives, give their raw bytes
back) or bytes. The sampling options are checked by sampling.py's `check_sampling` (an OptionError, a UserError,
names the option), for the API and the CLI alike.

Cached (default): the entropy model, local encoder and local decoder step one byte at a time with
their KV caches, patch boundaries are decided as bytes arrive, and the global model runs once per
patch (incremental.py). Uncached (`cache=False`, `--no-cache`): every byte re-runs the
whole context and re-patches it: the reference the cached path is tested against.
"""

from __future__ import annotations

import codecs
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from blt.artifacts import load_model
from blt.evaluate import check_device
from blt.generation.incremental import IncrementalBLT, IncrementalByteLM
from blt.generation.sampling import as_bytes, byte_logits, check_sampling, sample_next
from blt.generation.static_step import OneByteSteps
from blt.patching import Patcher, StreamingStarts, entropy
from blt.tokens import BOS_ID, EOS_ID, OFFSET, VOCAB_SIZE


class CachedState:
    """Everything that steps with the bytes: the entropy model, the patch-start rule of every row
    and the incremental BLT (or byte LM). Rows can be dropped or reordered (`take`) and another
    state's rows added (`append`), so a server's batch can change between steps."""

    def __init__(self, model, patcher: Patcher, batch: int, capacity: int, steps: OneByteSteps | None = None):
        self.is_blt = hasattr(model, "local_encoder")
        net = IncrementalBLT if self.is_blt else IncrementalByteLM
        self.net = net(model, batch, capacity, steps)
        self.elm = (
            IncrementalByteLM(patcher.model, batch, capacity, steps)
            if self.is_blt and patcher.model is not None
            else None
        )
        self.learned = patcher.learned  # the router's probabilities decide the starts, inside net.feed
        self.starts = [StreamingStarts(patcher.cfg, patcher.threshold) for _ in range(batch)]
        self.next_entropy = [math.inf] * batch  # entropy of each row's next byte
        self.device = next(model.parameters()).device

    def feed(self, rows: Sequence[Sequence[int]], every: bool = False) -> torch.Tensor:
        """New byte ids per row (possibly none) -> (B, V) next-byte logits of every row's last
        byte; every=True: (B, n, V) at each of the n = max(len(r)) new bytes (row b's first
        len(rows[b]) are real; not for HF-compatible BLT models)."""
        B, n = len(rows), max(1, max(len(r) for r in rows))
        tokens = torch.zeros(B, n, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        valid = torch.tensor([len(r) for r in rows], dtype=torch.long)
        tokens, valid = tokens.to(self.device), valid.to(self.device)
        if not self.is_blt:
            logits = self.net.feed(tokens, valid)  # (B, n, V)
            return logits if every else logits[torch.arange(B), (valid - 1).clamp(min=0)]
        if self.learned:
            return self.net.feed(tokens, lambda probs: self._decide(rows, probs), valid, every)
        ent = entropy(self.elm.feed(tokens, valid)).cpu() if self.elm is not None else None  # (B, n)
        starts = torch.zeros(B, n, dtype=torch.bool)
        for b, r in enumerate(rows):
            for i, tok in enumerate(r):
                h = self.next_entropy[b] if i == 0 else float(ent[b, i - 1]) if ent is not None else None
                starts[b, i] = self.starts[b].push(int(tok), h)
            if r and ent is not None:
                self.next_entropy[b] = float(ent[b, len(r) - 1])
        return self.net.feed(tokens, starts.to(self.device), valid, every)

    def _decide(self, rows: Sequence[Sequence[int]], probs: torch.Tensor) -> torch.Tensor:
        """Learned patching: (B, n) the router's probabilities of the new bytes -> (B, n) starts."""
        p = probs.cpu()
        starts = torch.zeros(p.shape, dtype=torch.bool)
        for b, r in enumerate(rows):
            for i, tok in enumerate(r):
                starts[b, i] = self.starts[b].push(int(tok), float(p[b, i]))
        return starts.to(self.device)

    @property
    def lens(self) -> torch.Tensor:
        """(B,) bytes fed to each row so far."""
        return self.net.lens

    def take(self, rows: Sequence[int]) -> None:
        """Keep these rows, in this order (a row named twice is copied)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.net.take(idx)
        if self.elm is not None:
            self.elm.take(idx)
        seen: set[int] = set()
        starts = []
        for i in rows:
            starts.append(copy.deepcopy(self.starts[i]) if i in seen else self.starts[i])
            seen.add(i)
        self.starts, self.next_entropy = starts, [self.next_entropy[i] for i in rows]

    def append(self, other: CachedState) -> None:
        """Add the rows of `other` (same model, patcher and capacity) after these."""
        self.net.append(other.net)
        if self.elm is not None:
            self.elm.append(other.elm)
        self.starts += other.starts
        self.next_entropy += other.next_entropy

    def counts(self) -> tuple[int, int]:
        """(global Transformer calls, patches they processed) so far."""
        return (self.net.global_calls, self.net.global_patches) if self.is_blt else (0, 0)


class Generator:
    """A model, its patcher and its context length, ready to sample; `stats` describes the last run."""

    def __init__(self, model, patcher: Patcher, context: int, cached: bool = True, compile: bool = False):
        """cached=False: always the uncached path, for a model whose weights are partitioned across
        ranks (ZeRO-3 gathers them only in module hooks; the cached path reads them directly).
        compile=True: the cached path's one-byte steps run compiled (static_step.py); the first
        generation compiles them (tens of seconds), later ones reuse the graphs."""
        self.model, self.patcher, self.context = model.eval(), patcher, context
        self.stats: dict = {}
        self.cached = cached
        self.steps = OneByteSteps() if compile else None

    @classmethod
    def load(cls, path: str, device: str = "cpu", compile: bool = False) -> Generator:
        """From a run dir, a checkpoint or an export dir (`blt export`)."""
        loaded = load_model(path, check_device(device))
        return cls(loaded.model, loaded.patcher, loaded.cfg.data.seq_len, compile=compile)

    def generate(self, prompts: Sequence[str | bytes], **kwargs) -> list[bytes]:
        """Generated bytes (without the prompt) for every prompt; see `stream` for the options."""
        out = [bytearray() for _ in prompts]
        for row, byte in self.stream(prompts, **kwargs):
            out[row].append(byte)
        return [bytes(o) for o in out]

    def stream(
        self,
        prompts: Sequence[str | bytes],
        max_bytes: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: Sequence[str | bytes] = (),
        cache: bool = True,
    ) -> Iterator[tuple[int, int]]:
        """Yield (row, byte value) as bytes are sampled. A row ends at EOS, after max_bytes, or
        right after it has produced one of the `stop` strings (which is included). Bad options
        raise here, before the first byte: OptionError for a value, TypeError for a lone string."""
        for what, seq in (("prompts", prompts), ("stop", stop)):
            if isinstance(seq, (str, bytes)):
                raise TypeError(f"{what} must be a list of strings or bytes, not one {type(seq).__name__}")
        max_bytes, temperature, top_k, top_p, seed = check_sampling(max_bytes, temperature, top_k, top_p, seed)
        rows = [[BOS_ID] + [b + OFFSET for b in as_bytes(p, f"prompt {i}")] for i, p in enumerate(prompts)]
        stops = [as_bytes(s, f"stop string {i}") for i, s in enumerate(stop)]
        if not rows:
            return iter(())
        return self._stream(rows, stops, max_bytes, temperature, top_k, top_p, seed, cache and self.cached)

    @torch.inference_mode()
    def _stream(self, rows, stops, max_bytes, temperature, top_k, top_p, seed, cache):
        B, dev = len(rows), next(self.model.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(seed)
        active, outs = [True] * B, [bytearray() for _ in range(B)]
        t0, produced = time.perf_counter(), 0
        compiled = sum(self.steps.calls.values()) if self.steps is not None else 0
        state, done = None, [0, 0, 0]  # global calls, patches and restarts of earlier cached states
        if cache:
            state, logits = self._restart(rows)
        else:
            logits = self._full(rows, active)
        for step in range(max_bytes):
            logits = byte_logits(logits)
            logits[~torch.tensor(active, device=logits.device)] = 0.0  # finished rows: ignored, but same RNG use
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            new = [[] for _ in range(B)]
            for b in range(B):
                if not active[b]:
                    continue
                tok = int(nxt[b])
                if tok == EOS_ID:
                    active[b] = False
                    continue
                rows[b].append(tok)
                outs[b].append(tok - OFFSET)
                new[b].append(tok)
                produced += 1
                yield b, tok - OFFSET
                if any(outs[b].endswith(s) for s in stops if s):
                    active[b] = False
            if not any(active) or step == max_bytes - 1:
                break
            if not cache:
                logits = self._full(rows, active)
            elif int(state.net.lens.max()) + 1 > self.context:  # context full: restart on the last half
                done = [a + b for a, b in zip(done, (*state.counts(), 1))]
                state, logits = self._restart(rows, self.context // 2)
            else:
                logits = state.feed(new)
        dt = time.perf_counter() - t0
        calls, patches = (done[0] + state.counts()[0], done[1] + state.counts()[1]) if cache else (None, None)
        self.stats = {
            "bytes": produced,
            "seconds": dt,
            "bytes_per_s": produced / max(dt, 1e-9),
            "cache": cache,
            "global_calls": calls,
            "global_patches": patches,
            "context_restarts": done[2],
            "compiled_steps": sum(self.steps.calls.values()) - compiled if self.steps is not None else 0,
        }

    def _restart(self, rows, keep: int | None = None):
        """A fresh cached state on each row's last `keep` bytes (default: the whole context)."""
        keep = keep or self.context
        state = CachedState(self.model, self.patcher, len(rows), self.context, self.steps)
        return state, state.feed([r[-keep:] for r in rows])

    def _full(self, rows, active) -> torch.Tensor:
        """Uncached: each active row's last `context` bytes, re-patched and re-run from scratch."""
        dev = next(self.model.parameters()).device
        out = torch.zeros(len(rows), VOCAB_SIZE, device=dev)
        for b, r in enumerate(rows):
            if active[b]:
                ctx = torch.tensor(r[-self.context :], dtype=torch.long, device=dev)[None]  # (1, T)
                out[b] = self.patcher.forward(self.model, ctx)[0][0, -1].float()
        return out


def stream_text(byte_iter: Iterator[int], write: Callable[[str], None]) -> bytes:
    """Write bytes as UTF-8 text as soon as each character is complete (invalid bytes become
    U+FFFD, so the output is always valid UTF-8); returns all bytes."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = bytearray()
    for b in byte_iter:
        out.append(b)
        text = dec.decode(bytes([b]))
        if text:
            write(text)
    tail = dec.decode(b"", final=True)
    if tail:
        write(tail)
    return bytes(out)
