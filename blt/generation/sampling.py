"""Sampling the next byte: temperature, top-k and top-p (nucleus) filtering, the options' ranges
(one check for the Python API and the CLI), and prompts and stop strings as bytes.

    ids = sample_next(logits, temperature=0.8, top_k=None, top_p=0.95, generator=g)   # (B, V) -> (B,)
"""

from __future__ import annotations

from typing import Annotated

import torch

from blt.tokens import EOS_ID, OFFSET
from blt.typed import NonNegFloat, NonNegInt, OptionError, PosInt, Range, Seed, check_option

MIN_TEMPERATURE = 1e-3  # the smallest temperature above 0: logits / T stays finite in float32 (below: use 0)
SAMPLING = {  # each sampling option's type and range (None is allowed for top_k and top_p: no filter)
    "max_bytes": NonNegInt,  # 0 = generate nothing (the prompt only)
    "temperature": NonNegFloat,  # 0 = greedy, else >= MIN_TEMPERATURE
    "top_k": PosInt,  # sample among the k most likely bytes
    "top_p": Annotated[float, Range(gt=0, le=1)],  # sample from the smallest set holding this probability
    "seed": Seed,
}


def check_sampling(
    max_bytes: int, temperature: float, top_k: int | None, top_p: float | None, seed: int, flag: bool = False
) -> tuple:
    """The options, checked (ints pass as floats); one outside its SAMPLING range (or a temperature
    in (0, MIN_TEMPERATURE)) is an OptionError naming it as Python spells it (top_p) or, with
    flag=True, as the CLI does (--top-p)."""
    given = dict(max_bytes=max_bytes, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    checked = tuple(
        check_option(name, value, SAMPLING[name], optional=name in ("top_k", "top_p"), flag=flag)
        for name, value in given.items()
    )
    if 0 < checked[1] < MIN_TEMPERATURE:  # logits / T would overflow float32 (all bytes 0xFF)
        raise OptionError(
            f"{'--temperature' if flag else 'temperature'} must be 0 (greedy) or >= "
            f"{MIN_TEMPERATURE:g}, got {temperature!r}"
        )
    return checked


def as_bytes(text: str | bytes, what: str) -> bytes:
    """A prompt or stop string as bytes: str as UTF-8, where surrogate escapes (argv's undecodable
    bytes) give their raw bytes back."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    if not isinstance(text, str):
        raise OptionError(f"{what} must be str or bytes, got {type(text).__name__}")
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as e:
        raise OptionError(f"{what} holds {text[e.start]!r}, which has no UTF-8 bytes (pass bytes instead)") from None


def byte_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) model logits -> a float copy in which only the 256 bytes and EOS can be sampled."""
    out = logits.float().clone()
    eos = out[..., EOS_ID].clone()
    out[..., :OFFSET] = float("-inf")
    out[..., EOS_ID] = eos
    return out


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) ids. temperature 0 is greedy; top-k then top-p (nucleus) filtering.
    A sampled row draws one uniform number u from `generator` and takes the first id whose
    cumulative probability exceeds u (inverse CDF), so each row's draw depends on its own logits
    and u only: `uniforms` (B,) passes draws made elsewhere (a server's per-request RNGs)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    target = (uniforms.to(cdf)[:, None] * cdf[:, -1:]).contiguous()  # (B, 1) in [0, total mass)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
