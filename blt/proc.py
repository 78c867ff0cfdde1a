"""This process's place in a launched job, as the launcher's environment gives it (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE: torchrun, the deepspeed launcher, srun + torchrun and
`accelerate launch` all set them), read here and nowhere else; and progress messages, which only
rank 0 prints (to stderr: stdout carries results).

    place = launched()        # Place(rank=0, world_size=1, local_rank=0, local_world_size=1) alone
    log("data: ...")
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
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
