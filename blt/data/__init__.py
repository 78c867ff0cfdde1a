"""Bytes in, batches out. Inputs are read as documents (documents), prepared into shards
(prepare, in the format of shards), with entropies beside them (entropies); the data config names
prepared directories or files prepared into the cache (corpus); the training stream mixes the
sources and hands each rank its share (stream); evaluation_windows cuts held-out bytes into
the in-order windows evaluation scores. The byte ids themselves are blt/tokens.py (re-exported
here)."""

from blt.data.corpus import BUNDLED_DIR, Corpus, encode_files, prepare_data
from blt.data.documents import DataError, resolve_files
from blt.data.evaluation_windows import eval_windows
from blt.data.stream import Batch, Source, StreamLoader
from blt.tokens import BOS_ID, EOS_ID, OFFSET, PAD_ID, VOCAB_SIZE, decode, encode, encode_documents

__all__ = [
    "BOS_ID",
    "BUNDLED_DIR",
    "Batch",
    "Corpus",
    "DataError",
    "EOS_ID",
    "OFFSET",
    "PAD_ID",
    "Source",
    "StreamLoader",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "encode_documents",
    "encode_files",
    "eval_windows",
    "prepare_data",
    "resolve_files",
]
