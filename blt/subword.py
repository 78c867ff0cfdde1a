"""Subword tokenizers for the token baseline, with HF `tokenizers`: `blt tokenizer train` fits a
byte-level BPE (GPT-2 / Llama 3 style: every byte is in the base vocabulary, so no text is out of
vocabulary) on the same inputs `blt prepare` reads, and writes a HF tokenizer directory
(tokenizer.json + tokenizer_config.json) that `transformers.AutoTokenizer` loads as it is.

    blt tokenizer train blt/data/shakespeare/train --vocab 4096 --out tokenizers/shakespeare
    tok = load_tokenizer("tokenizers/shakespeare")          # a tokenizer.json, or a directory holding one
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from blt.config import DataConfig, SampleBy
from blt.data.documents import DataError, file_documents, read_input, resolve_files
from blt.errors import UserError
from blt.typed import PosInt, Range, check_fields

EOS = "<|endoftext|>"  # the one special token: the end of a document
MAX_VOCAB = 1 << 20


class TokenizerError(UserError):
    """A tokenizer that cannot be read or written; one line naming the path and the fix."""


@dataclass(frozen=True)
class TrainOptions:
    """`blt tokenizer train`'s flags (the same names)."""

    out: str  # the tokenizer directory to write (must not exist, or be empty)
    sources: list[str] = field(default_factory=list)  # files, directories or globs (txt, jsonl, json, parquet)
    vocab: Annotated[int, Range(ge=258, le=MAX_VOCAB)] = 4096  # 256 bytes + EOS + at least one merge
    min_frequency: PosInt = 2  # a pair merged must occur at least this often
    text_field: str = DataConfig.text_field  # the text column of json/jsonl/parquet
    sample_by: SampleBy = DataConfig.sample_by  # plain text: document, paragraph or line

    def checked(self) -> TrainOptions:
        opts = check_fields(self, flag=True)
        if not opts.sources:
            raise DataError("nothing to train on: pass SOURCES (files, directories or globs)")
        return opts


def documents(files: list[Path], text_field: str, sample_by: str) -> Iterator[str]:
    """Every document of the files as text (bytes that are not UTF-8 become U+FFFD: the
    tokenizer's statistics only; its byte alphabet still covers any byte)."""
    for path in files:
        for data, lengths in file_documents(path, read_input(path), text_field, sample_by):
            start = 0
            for n in lengths.tolist():
                yield bytes(data[start : start + n]).decode("utf-8", errors="replace")
                start += n


def byte_level_bpe(vocab: int, min_frequency: int):
    """An untrained byte-level BPE tokenizer and its trainer (HF tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def _claim(out: Path) -> None:
    """Refuse an `out` that holds anything: a tokenizer never overwrites files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TokenizerError(f"--out '{out}' already exists and is not an empty directory; pass a new path")


def train(opts: TrainOptions, log=print) -> dict:
    """Train, write opts.out (atomically: a temporary directory beside it, renamed), and return a
    summary: vocabulary, bytes trained on, bytes per token on them, seconds."""
    from transformers import PreTrainedTokenizerFast

    opts = opts.checked()
    out = Path(opts.out).expanduser()
    _claim(out)
    files = resolve_files(opts.sources, "SOURCES")
    texts = list(documents(files, opts.text_field, opts.sample_by))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    if nbytes == 0:
        raise DataError("the SOURCES hold no text; pass files with some text")
    t0 = time.time()
    tok, trainer = byte_level_bpe(opts.vocab, opts.min_frequency)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    seconds = time.time() - t0
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        fast.save_pretrained(str(tmp))
        _claim(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out)  # onto nothing or an empty directory; a racing writer's rename fails here
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TokenizerError(
            f"--out '{out}' was written by another process meanwhile ({e.strerror}); pass a new path"
        ) from None
    summary = {
        "out": str(out),
        "vocab": tok.get_vocab_size(),
        "bytes": nbytes,
        "tokens": tokens,
        "bytes_per_token": nbytes / max(1, tokens),
        "documents": len(texts),
        "seconds": round(seconds, 2),
    }
    log(json.dumps(summary))
    return summary


def load_tokenizer(path: str | os.PathLike):
    """A HF `tokenizers.Tokenizer` from a tokenizer.json or a directory holding one."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise TokenizerError(
            f"no tokenizer at '{path}' (give a tokenizer.json or a HF tokenizer directory holding one; "
            f"`blt tokenizer train` writes one)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exceptions for a malformed file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"'{file}' is not a tokenizer HF tokenizers can read ({first})") from None


def tokenizer_digest(tok) -> str:
    """sha256 of the tokenizer's canonical JSON: a run records it, so a resume with another tokenizer
    is caught."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
