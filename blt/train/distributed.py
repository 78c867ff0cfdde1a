"""Who am I among the processes of a job, and the few collectives the training loop needs.

One process (no launcher) needs no process group: `Dist()` answers rank 0 of 1 and every
collective is the identity. Under torchrun, the deepspeed launcher, SLURM + torchrun or
`accelerate launch`, the launcher's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
environment describes the job and `init_distributed` joins the process group (gloo on CPU, nccl
on GPU) with a timeout, so a lost peer fails the job instead of hanging it.

This module uses torch.distributed only; DeepSpeed lives in blt/train/deepspeed_engine.py.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as td

from blt.config import Config, ConfigError
from blt.errors import UserError
from blt.net import free_port
from blt.proc import Place, launched


class PeerLostError(UserError):
    """Another process of the job died or stopped answering; one-line message."""


class Dist(Place):
    """This process's place in the job (blt.proc.Place: rank, world_size, local_rank,
    local_world_size) and the collectives among the job's processes."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and td.is_available() and td.is_initialized()

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so byte counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        td.all_reduce(t)
        return t.tolist()

    def all_sum_named(self, values: dict) -> dict:
        """`all_sum` of named numbers in one collective: a name holds a number, a list of numbers or
        another such dict. Every rank passes the same names in the same order; the sums come back in
        the shape given."""

        def leaves(v) -> list:
            if isinstance(v, dict):
                return [x for item in v.values() for x in leaves(item)]
            return list(v) if isinstance(v, list) else [v]

        sums = iter(self.all_sum(leaves(values)))

        def shape(v):
            if isinstance(v, dict):
                return {name: shape(item) for name, item in v.items()}
            return [next(sums) for _ in v] if isinstance(v, list) else next(sums)

        return shape(values)

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        td.broadcast_object_list(box, src=src)
        return box[0]

    def on_main_first(self, fn, share: bool = False):
        """Rank 0 runs `fn` first (preparing a cache, a directory); then, if it succeeded, the other
        ranks run it too (finding the cache) or, with share=True, receive rank 0's result. A user
        error on rank 0 is raised on every rank, so none is left waiting at a collective."""
        if not self.active:
            return fn()
        status = None
        if self.is_main:
            try:
                result = fn()
                status = ("ok", result if share else None)
            except UserError as e:
                status = ("error", e)
        status = self.broadcast_object(status)
        if status[0] == "error":
            raise status[1]
        if self.is_main:
            return result
        return status[1] if share else fn()

    def _device(self) -> torch.device:
        if td.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def launched_world() -> Dist:
    """The job as the launcher's environment describes it (no process group is joined)."""
    return Dist(**asdict(launched()))


def choose_engine(cfg: Config, world: Dist) -> str:
    """Resolve distributed.engine=auto: accelerate under `accelerate launch`, deepspeed under any
    other multi-process launcher, local for one process."""
    engine = cfg.distributed.engine
    if engine == "auto":
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return "accelerate"
        return "deepspeed" if world.world_size > 1 else "local"
    if engine == "local" and world.world_size > 1:
        raise ConfigError(
            f"the launcher started {world.world_size} processes but distributed.engine=local trains "
            "in one; use distributed.engine=deepspeed (or auto)"
        )
    return engine


def backend_for(cfg: Config, device: torch.device) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(cfg: Config, world: Dist, device: torch.device) -> Dist:
    """Join the process group the launcher set up (one process: a group of one on a free local
    port, which DeepSpeed needs). Returns `world`, now able to run collectives."""
    if td.is_initialized():
        return world
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.world_size))
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    backend = backend_for(cfg, device)
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend=nccl needs GPUs; use distributed.backend=gloo (or auto) on CPU")
    try:
        td.init_process_group(backend, timeout=timedelta(minutes=cfg.distributed.timeout_minutes))
    except (RuntimeError, ValueError) as e:  # rendezvous failures: unreachable master, port in use
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerLostError(
            f"could not join the process group at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} ({msg}); check MASTER_ADDR/MASTER_PORT and that "
            "every node was launched"
        ) from None
    return world


def is_peer_failure(err: BaseException) -> bool:
    """Does this exception mean a collective lost another process (as opposed to a bug here)?"""
    dist_errors = tuple(getattr(td, n) for n in ("DistError", "DistBackendError", "DistNetworkError") if hasattr(td, n))
    if dist_errors and isinstance(err, dist_errors):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text
        for s in (
            "connection closed by peer",
            "connection reset by peer",
            "broken pipe",
            "timed out",
            "timeout",
            "gloo",
            "nccl",
            "socket",
            "connection refused",
            "heartbeat",
        )
    )


def shutdown() -> None:
    if td.is_available() and td.is_initialized():
        try:
            td.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving a broken group must not mask the real error
            pass
