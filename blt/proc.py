"""This process's place in a launched job, as the launcher's environment gives it (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE: torchrun, the deepspeed launcher, srun + torchrun and
`accelerate launch` all set them), read here and nowhere else; and progress messages, which only
rank 0 prints (to stderr: stdout carries results), as do the libraries' loggers.

    place = launched()        # Place(rank=0, world_size=1, local_rank=0, local_world_size=1) alone
    log("data: ...")
    library_logs_to_stderr()  # once, as the CLI starts
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """Where this process sits in its job; blt.train.distributed.Dist is a Place that also runs
    the job's collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def launched() -> Place:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return Place(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), local_world)


def log(text: str) -> None:
    """A progress message on stderr, from rank 0 only."""
    if launched().rank == 0:
        print(text, file=sys.stderr, flush=True)


class _Stderr:
    """sys.stderr as it is when a record is written (a test may swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _to_stderr(handler: logging.Handler) -> None:
    if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
        handler.setStream(_Stderr())


class _StderrLogger(logging.Logger):
    """A logger whose handlers never write to stdout."""

    def addHandler(self, hdlr: logging.Handler) -> None:
        _to_stderr(hdlr)
        super().addHandler(hdlr)


def library_logs_to_stderr() -> None:
    """Send every logger's stdout output to stderr: DeepSpeed's, whose handler writes to stdout
    ("[WARNING] ... MPU is not provided" on a resume), and any library's, imported now or later
    (their loggers are made as _StderrLogger), so that stdout carries only blt's results."""
    logging.setLoggerClass(_StderrLogger)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            _to_stderr(handler)
