"""Bytes <-> token ids: byte b is id b + OFFSET; ids below OFFSET are special.

    ids = encode("héllo")          # uint16 [BOS, 108, 199, 173, ...,  EOS]
    decode(ids) == "héllo".encode()

The layout (4 special ids, 256 byte ids, vocab 260) is the one of HF transformers' BLT.
Any byte string round-trips exactly, valid UTF-8 or not.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0  # padding; targets equal to PAD_ID are ignored by the loss
BOS_ID = 1  # begins every document
EOS_ID = 2  # ends every document
OFFSET = 4  # byte b -> id b + OFFSET (id 3 is reserved)
VOCAB_SIZE = 256 + OFFSET


def _as_bytes(data: str | bytes) -> bytes:
    if isinstance(data, str):
        # surrogateescape: a str decoded with errors="surrogateescape" gives its bytes back
        return data.encode("utf-8", errors="surrogateescape")
    return bytes(data)


def encode(data: str | bytes, bos: bool = True, eos: bool = True) -> np.ndarray:
    """One document -> uint16 ids: [BOS] + (byte + OFFSET for each UTF-8 byte) + [EOS]."""
    raw = np.frombuffer(_as_bytes(data), dtype=np.uint8)
    out = np.empty(len(raw) + int(bos) + int(eos), dtype=np.uint16)
    if bos:
        out[0] = BOS_ID
    if eos:
        out[-1] = EOS_ID
    out[int(bos) : int(bos) + len(raw)] = raw.astype(np.uint16) + OFFSET
    return out


def decode(ids) -> bytes:
    """Ids (list, numpy or torch, any shape) -> bytes; special and out-of-range ids are dropped."""
    if hasattr(ids, "detach"):  # torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    arr = arr[(arr >= OFFSET) & (arr < VOCAB_SIZE)]
    return (arr - OFFSET).astype(np.uint8).tobytes()


def encode_documents(data: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Many documents at once: `data` is their bytes back to back (uint8), `lengths` their sizes.

    Returns the packed stream BOS d0 EOS BOS d1 EOS ... as uint16, len = data.size + 2 * len(lengths).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n, nbytes = len(lengths), int(lengths.sum())
    if nbytes != data.size:
        raise ValueError(f"lengths sum to {nbytes} but data holds {data.size} bytes")
    out = np.empty(nbytes + 2 * n, dtype=np.uint16)
    # document d starts at (bytes before d) + 2 * d in the output
    starts = np.cumsum(lengths) - lengths + 2 * np.arange(n, dtype=np.int64)  # (n,)
    special = np.zeros(len(out), dtype=bool)
    special[starts] = special[starts + lengths + 1] = True
    out[starts] = BOS_ID
    out[starts + lengths + 1] = EOS_ID
    out[~special] = np.add(data, OFFSET, dtype=np.uint16)
    return out
