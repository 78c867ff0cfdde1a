"""Bytes in, token batches out: cached packed corpora (corpus) and batches (loader); the byte ids
themselves are blt/tokens.py (re-exported here)."""

from blt.data.corpus import (
    BUNDLED_DIR,
    DataError,
    PackedData,
    PackedSplit,
    encode_files,
    prepare_data,
    read_tokens,
    resolve_files,
)
from blt.data.loader import ByteLoader, eval_windows
from blt.tokens import BOS_ID, EOS_ID, OFFSET, PAD_ID, VOCAB_SIZE, decode, encode, encode_documents

__all__ = [
    "BOS_ID", "BUNDLED_DIR", "ByteLoader", "DataError", "EOS_ID", "OFFSET", "PAD_ID", "PackedData",
    "PackedSplit", "VOCAB_SIZE", "decode", "encode", "encode_documents", "encode_files", "eval_windows",
    "prepare_data", "read_tokens", "resolve_files",
]
