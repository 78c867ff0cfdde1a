"""What lm-evaluation-harness asks of a language model, computed on a blt model in batched
forwards (pure torch; lm_eval is never imported here, blt/harness/lm.py adapts it).

    scorer = Scorer(loaded.model, loaded.patcher, context=loaded.cfg.data.seq_len, batch_size=16)
    scorer.loglikelihood([(b"The cat", b" sat")])   # [(sum of log p of the continuation bytes, greedy?)]
    scorer.rolling([b"a whole document"])           # [sum of log p of every byte of it]
    scorer.generate([b"Q: 2+2?\\nA:"], until=[b"\\n"], max_bytes=32)   # [b" 4"] (greedy, stop cut off)

Every request becomes one or more *pieces*: a row of byte ids (at most `context` of them, starting
with BOS unless the context was cut from the left) and the targets in it that are scored. Pieces
are sorted by length, longest first (so a batch that does not fit fails at once), packed into
batches of up to `batch_size` rows, right-padded with PAD_ID and run in one forward each; patches
come from the patcher on the padded batch, which is exact: a patch boundary at byte t depends only
on bytes up to t, and the model is causal.

- loglikelihood: context and continuation in one row, `BOS + context + continuation`, the whole
  row as input (so the last continuation byte is predicted exactly as inside a longer text, also
  for HF-compatible models, whose byte reads the patch its next byte closes). A context too long
  for the model is cut from the left; a continuation longer than the context is scored in pieces.
- rolling: the document as `blt eval` reads a one-document file, `BOS + bytes + EOS`, in
  `eval_windows`' windows (each shares one byte with the next), every byte scored once and EOS
  not: its bits per byte equal `blt eval --data FILE`'s.
- shared context (`share_context=True`, the default): requests with the same context, such as a
  multiple-choice question's choices, have the context encoded once by the cached incremental
  model (blt/generation), its state copied once per continuation and each continuation fed after
  it, with the logits at every continuation byte: the same numbers as the full forward (within
  float rounding), for groups of at least 2 continuations no longer than the context that fit in
  the model's context together with it; not for HF-compatible models (whose byte reads the patch
  its next byte closes), amp autocast or `cached=False`, which score every request as above.
- generate: greedy (or sampled) bytes from the one generation loop (as `blt generate` and the
  server), cut before the first stop string.

`sync` (optional) makes every rank of a job run the same number of forwards, as ZeRO-3 needs: it
maps this rank's count to the largest count over ranks; the ranks short of it run padding forwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from blt.device import autocast_ctx
from blt.errors import UserError
from blt.generation.cached import CachedState
from blt.generation.engine import Engine, Params, Row
from blt.generation.sampling import byte_logits
from blt.tokens import BOS_ID, OFFSET, PAD_ID, encode


class BatchTooLargeError(UserError):
    """A batch of pieces does not fit in the device's memory; one line naming the fix."""


@dataclass
class Piece:
    request: int  # index of the request it belongs to
    ids: list[int]  # input bytes of the row (BOS-led unless cut), unpadded
    targets: list[int]  # same length: the id to score at each input position (the next byte), -1 = not scored
    pad_to: int = 0  # right-pad the input to at least this many bytes (rolling: eval_windows' width)


def _ids(data: bytes) -> list[int]:
    return [b + OFFSET for b in data]


def continuation_pieces(request: int, context: bytes, continuation: bytes, width: int) -> list[Piece]:
    """Pieces scoring `continuation` after `context`: one row `BOS + context + continuation`, cut
    from the left to `width` bytes; a continuation longer than that is scored chunk by chunk,
    backwards, each chunk with as much of the text before it as fits."""
    tokens = [BOS_ID] + _ids(context) + _ids(continuation)
    first = len(tokens) - len(continuation)  # position of the first scored byte
    pieces, end = [], len(tokens)
    while end > first:
        start = max(0, end - width)
        lo = max(first, start + 1)  # targets lo .. end - 1, predicted at lo - 1 .. end - 2
        row = tokens[start:end]
        targets = [-1] * len(row)
        for j in range(lo, end):
            targets[j - 1 - start] = tokens[j]
        pieces.append(Piece(request, row, targets))
        end = lo
    return pieces


def rolling_pieces(request: int, document: bytes, width: int) -> list[Piece]:
    """Pieces scoring every byte of `document` (not its BOS or EOS) in eval_windows' windows:
    window i holds ids [i * width, i * width + width] of BOS + document + EOS."""
    tokens = encode(document).astype("int64").tolist()
    pieces = []
    for start in range(0, len(tokens) - 1, width):
        window = tokens[start : start + width + 1]  # (<= width + 1,) inputs and their next bytes
        targets = [t if t >= OFFSET else -1 for t in window[1:]]
        pieces.append(Piece(request, window[:-1], targets, pad_to=width))
    return pieces


class Scorer:
    """A model, its patcher and its context length (bytes), scoring requests in batches."""

    def __init__(
        self,
        model,
        patcher,
        context: int,
        batch_size: int = 16,
        amp_dtype: torch.dtype | None = None,
        sync: Callable[[int], int] | None = None,
        cached: bool = True,
        share_context: bool = True,
    ):
        """cached=False: weights partitioned across ranks (ZeRO-3), which the cached generator
        cannot read; generation then re-runs each row's context per byte, in step with the ranks.
        share_context=False: every loglikelihood request in its own full-forward row."""
        self.model, self.patcher, self.context = model, patcher, context
        self.batch_size, self.amp_dtype, self.sync, self.cached = batch_size, amp_dtype, sync, cached
        hf = bool(getattr(getattr(model, "local_decoder", None), "hf_compat", False))
        self.share_context = share_context and cached and not hf and amp_dtype in (None, torch.float32)
        self.device = next(model.parameters()).device
        self.forwards = 0  # batched forwards run so far (padding forwards included)
        self.shared = 0  # loglikelihood requests scored with a shared context so far

    # ------------------------------------------------------------------------- requests

    def loglikelihood(self, requests: Sequence[tuple[bytes, bytes]]) -> list[tuple[float, bool]]:
        """(context, continuation) pairs -> (log p(continuation | context) in nats, whether greedy
        decoding would produce the continuation: every byte the argmax)."""
        groups = self._shared_groups(requests) if self.share_context else []
        grouped = {i for g in groups for i in g}
        pieces = [
            p
            for i, (ctx, cont) in enumerate(requests)
            if i not in grouped
            for p in continuation_pieces(i, ctx, cont, self.context)
        ]
        sums, greedy = self._score(pieces, len(requests))
        for i, (logp, hit) in self._score_shared(requests, groups).items():
            sums[i], greedy[i] = logp, hit
        return list(zip(sums, greedy))

    def rolling(self, documents: Sequence[bytes]) -> list[float]:
        """Log p (nats) of every byte of each document, read as `blt eval` reads a one-document file."""
        pieces = [p for i, doc in enumerate(documents) for p in rolling_pieces(i, doc, self.context)]
        return self._score(pieces, len(documents))[0]

    def generate(
        self, contexts: Sequence[bytes], until: Sequence[bytes], max_bytes: int, temperature: float = 0.0, seed: int = 0
    ) -> list[bytes]:
        """Bytes generated after each context by the one generation loop (blt/generation/engine.py;
        greedy at temperature 0), each cut before the first stop string it produced; at most
        max_bytes. Uncached (`cached=False`), every rank runs as many forwards per step as the rank
        with the most unfinished rows (padding forwards), as ZeRO-3 needs."""
        params = Params(max_bytes, temperature, seed=seed, stop=[s for s in until if s])
        rows = [Row([BOS_ID] + _ids(c), params) for c in contexts]
        engine = Engine(self.model, self.patcher, self.context, cached=self.cached, forward=self._forward)
        with torch.inference_mode() if self.cached else contextlib.nullcontext():
            engine.add(rows)
            while True:
                live = len(engine.rows)
                most = self.sync(live) if self.sync is not None and not self.cached else live
                if most == 0:
                    break
                engine.step()
                for _ in range(most - live):  # this rank's rows ended first: keep in step with the others
                    self._forward(torch.full((1, 1), BOS_ID, dtype=torch.long))
        return [cut_at_stop(bytes(r.out), until) for r in rows]

    # ------------------------------------------------------------------------- shared contexts

    def _shared_groups(self, requests: Sequence[tuple[bytes, bytes]]) -> list[list[int]]:
        """Indices of requests with one context, where encoding it once pays: at least 2 non-empty
        continuations, none longer than the context, each fitting after BOS + context."""
        by_context: dict[bytes, list[int]] = {}
        for i, (ctx, _) in enumerate(requests):
            by_context.setdefault(ctx, []).append(i)
        groups = []
        for ctx, idx in by_context.items():
            conts = [len(requests[i][1]) for i in idx]
            fits = 1 + len(ctx) + max(conts) <= self.context
            if len(idx) >= 2 and 0 < min(conts) and max(conts) <= len(ctx) and fits:
                groups.append(idx)
        return groups

    @torch.inference_mode()
    def _score_shared(
        self, requests: Sequence[tuple[bytes, bytes]], groups: list[list[int]]
    ) -> dict[int, tuple[float, bool]]:
        """Score the groups' requests, up to `batch_size` contexts (and 4 x `batch_size`
        continuations) per cached state, longest context first."""
        out: dict[int, tuple[float, bool]] = {}
        groups = sorted(groups, key=lambda g: -len(requests[g[0]][0]))
        batch: list[list[int]] = []
        for g in groups:
            if batch and (len(batch) == self.batch_size or sum(map(len, batch)) + len(g) > 4 * self.batch_size):
                out.update(self._shared_batch(requests, batch))
                batch = []
            batch.append(g)
        if batch:
            out.update(self._shared_batch(requests, batch))
        return out

    def _shared_batch(
        self, requests: Sequence[tuple[bytes, bytes]], groups: list[list[int]]
    ) -> dict[int, tuple[float, bool]]:
        """One cached state: [BOS] + each context (ragged), its rows copied once per continuation,
        then the continuations (ragged) with the logits at every byte."""
        contexts = [[BOS_ID] + _ids(requests[g[0]][0]) for g in groups]
        conts = [_ids(requests[i][1]) for g in groups for i in g]
        width = max(map(len, contexts)) + max(map(len, conts))  # every row's padding goes in the cache too
        copies = [k for k, g in enumerate(groups) for _ in g]
        try:
            state = CachedState(self.model, self.patcher, len(groups), width)
            first = state.feed(contexts)  # (G, V) logits of each context's last byte: its first continuation byte
            state.take(copies)
            rest = state.feed(conts, every=True)  # (R, n, V): logits after continuation byte j predict j + 1
        except torch.cuda.OutOfMemoryError:
            raise BatchTooLargeError(
                f"{len(groups)} shared contexts with {len(conts)} continuations of up to {width} bytes do not fit in "
                f"{self.device} memory; use a smaller batch size (now {self.batch_size})"
            ) from None
        logits = torch.cat([first[copies][:, None], rest[:, :-1]], 1).float()  # (R, n, V) predicting byte j
        n = logits.shape[1]
        targets = torch.full((len(conts), n), -1, dtype=torch.long)  # (R, n) bytes, -1 = padding
        for r, c in enumerate(conts):
            targets[r, : len(c)] = torch.tensor(c)
        logp, hit = _pick(logits, targets.to(logits.device))
        self.shared += len(conts)
        rows = [i for g in groups for i in g]
        return {i: (float(logp[r]), bool(hit[r])) for r, i in enumerate(rows)}

    # ------------------------------------------------------------------------- batches

    def _score(self, pieces: list[Piece], num_requests: int) -> tuple[list[float], list[bool]]:
        sums, greedy = [0.0] * num_requests, [True] * num_requests
        order = sorted(range(len(pieces)), key=lambda i: -max(len(pieces[i].ids), pieces[i].pad_to))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rounds = self.sync(len(batches)) if self.sync is not None else len(batches)
        for b in range(rounds):
            if b >= len(batches):  # this rank's share ran out: a forward that scores nothing keeps ranks in step
                self._forward(torch.full((1, self.context), PAD_ID, dtype=torch.long))
                continue
            rows = [pieces[i] for i in batches[b]]
            width = max(max(len(p.ids), p.pad_to) for p in rows)
            ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)  # (b, T) bytes
            targets = torch.full((len(rows), width), -1, dtype=torch.long)  # (b, T) bytes
            for r, p in enumerate(rows):
                ids[r, : len(p.ids)] = torch.tensor(p.ids)
                targets[r, : len(p.targets)] = torch.tensor(p.targets)
            logp, hit = self._target_logprobs(ids, targets)
            for r, p in enumerate(rows):
                sums[p.request] += float(logp[r])
                greedy[p.request] &= bool(hit[r])
        return sums, greedy

    def _target_logprobs(self, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T) inputs and targets (-1 = not scored) -> per row: the sum of the targets' log
        probabilities, and whether every target is the argmax among what greedy decoding may emit
        (the 256 bytes and EOS, as the Generator)."""
        logits = self._forward(ids)  # (b, T, V)
        return _pick(logits.float(), targets.to(logits.device))

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        self.forwards += 1
        try:
            with autocast_ctx(self.device, self.amp_dtype):
                return self.patcher.forward(self.model, ids)[0]  # (b, T, V) next-byte logits
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since torch 2.5
            raise BatchTooLargeError(
                f"a batch of {ids.shape[0]} rows of {ids.shape[1]} bytes does not fit in {self.device} memory; "
                f"use a smaller batch size (now {self.batch_size})"
            ) from None


def _pick(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T, V) float logits, (b, T) targets (-1 = not scored) -> per row: the sum of the targets'
    log probabilities, and whether every target is the argmax among what greedy decoding may emit."""
    scored = targets >= 0
    logp = torch.log_softmax(logits, dim=-1)
    tgt = targets.clamp(min=0)
    picked = logp.gather(-1, tgt[..., None])[..., 0].masked_fill(~scored, 0.0)  # (b, T)
    hit = (byte_logits(logits).argmax(-1) == tgt) | ~scored  # (b, T): greedy decoding's choice, as the Generator's
    return picked.double().sum(1).cpu(), hit.all(1).cpu()


def cut_at_stop(text: bytes, until: Sequence[bytes]) -> bytes:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        at = text.find(s) if s else -1
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]
