"""`blt prepare`: shards from input files (blt/data/prepare.py) and, with --entropy-model, their
entropies (blt/data/entropies.py), shared out over every rank of a torchrun job.

    blt prepare corpus/ --out data/corpus --workers 8
    blt prepare --out data/corpus --entropy-model runs/entropy --seq-len 1024          # entropies only
    torchrun --nproc-per-node 8 -m blt prepare --out data/corpus --entropy-model runs/entropy --seq-len 1024

Under a launcher, rank 0 prepares the shards (if SOURCES are given) while the others wait; then every
rank computes the entropies of its own shards (shard k on rank k mod world size), on its GPU when
there is one. A rerun skips the shards already done.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from blt.config import DataConfig, SampleBy, SeqLen
from blt.data.documents import DataError
from blt.data.prepare import SHARD_MB, Settings, parse_part, prepare
from blt.data.shards import Prepared
from blt.proc import log
from blt.typed import PosFloat, PosInt, Range, Seed, check_fields


@dataclass(frozen=True)
class PrepareOptions:
    """`blt prepare`'s flags (the same names). The shard settings and seq_len are data.* fields:
    the data config's defaults and ranges (val_fraction may also be 1: a held-out-only directory)."""

    out: str  # the prepared directory
    sources: list[str] = field(default_factory=list)  # files, directories, globs or hub:NAME
    workers: PosInt = 1  # processes reading and packing shards
    part: str | None = None  # K/N: part K of N (several machines)
    shard_mb: PosFloat = SHARD_MB  # input MB per shard
    val_fraction: Annotated[float, Range(ge=0, le=1)] = DataConfig.val_fraction  # documents held out
    text_field: str = DataConfig.text_field  # the text column of json/jsonl/parquet
    sample_by: SampleBy = DataConfig.sample_by  # plain text: document, paragraph or line
    seed: Seed = DataConfig.seed  # which documents are held out
    entropy_model: str | None = None  # compute float16 entropies with this byte_lm run
    seq_len: SeqLen = DataConfig.seq_len  # the training data.seq_len the entropies are for
    batch: PosInt = 16  # windows per entropy-model forward

    @property
    def settings(self) -> Settings:
        return Settings(self.text_field, self.sample_by, self.val_fraction, self.seed)

    def checked(self) -> PrepareOptions:
        """These options, each checked (a one-line error naming its flag) before anything is read."""
        self.settings.check()  # in the words prepare() uses for the shard settings
        opts = check_fields(self, flag=True)
        if not opts.sources and not opts.entropy_model:
            raise DataError("nothing to do: pass SOURCES to prepare and/or --entropy-model MODEL to compute entropies")
        parse_part(opts.part)
        return opts


def _world():
    """This process's place in the job, with a gloo process group joined when there are several
    (the ranks only wait for each other; the entropy model runs on each rank's own device)."""
    import torch.distributed as td

    from blt.train.distributed import launched_world

    world = launched_world()
    if world.world_size > 1 and not td.is_initialized():
        td.init_process_group("gloo", timeout=timedelta(hours=2))
    return world


def entropy_patcher(model: str, local_rank: int):
    """The frozen entropy model `model` (a run dir or checkpoint of a byte_lm) in a Patcher, on this
    rank's GPU when there is one."""
    import torch

    from blt.artifacts import build_patcher
    from blt.config import Config

    cfg = Config()
    cfg.patching.mode, cfg.patching.entropy_model = "entropy", model
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return build_patcher(cfg, device)


def compute_entropies(out: Path, model: str, seq_len: int, batch: int, world) -> dict:
    """Every shard's entropies under `out`, this rank its share; returns what rank 0 reports."""
    from blt.data.entropies import EntropyStore, model_fingerprint

    data = Prepared.open(out, "--out")
    patcher = entropy_patcher(model, world.local_rank)
    store = EntropyStore(data, model_fingerprint(patcher.model), seq_len, str(Path(model).resolve()))
    if world.is_main:
        log(
            f"entropies: {len(store.missing())} of {len(data.shards)} shards to compute on {world.world_size} "
            f"rank(s) -> {store.dir}"
        )
    done = store.compute(patcher, world.rank, world.world_size, batch=batch, log=log)
    done = int(world.all_sum([done])[0]) if world.active else done
    world.barrier()
    if store.missing():
        raise DataError(
            f"entropies of {len(store.missing())} shards of '{out}' are still missing; rerun the "
            "same command to compute them"
        )
    return {"entropies": str(store.dir), "entropy_bytes_computed": done}


def run(opts: PrepareOptions) -> None:
    opts = opts.checked()  # before a process group is joined
    world = _world()
    report: dict = {}
    if opts.sources:

        def build():
            return prepare(
                opts.sources,
                opts.out,
                opts.settings,
                workers=opts.workers,
                part=opts.part,
                shard_mb=opts.shard_mb,
                progress=sys.stderr.isatty(),
                log=log,
            )

        manifest = world.on_main_first(build, share=True)
        if "shards" not in manifest:  # one part of several, not all done: no entropies yet
            print(json.dumps({"out": opts.out, "part": manifest["part"], "of": manifest["of"]}))
            return
        report = {
            "out": opts.out,
            "train_bytes": manifest["train"]["tokens"],
            "val_bytes": manifest["val"]["tokens"],
            "documents": manifest["train"]["docs"] + manifest["val"]["docs"],
            "shards": len(manifest["shards"]),
        }
    if opts.entropy_model:
        report.update(compute_entropies(Path(opts.out), opts.entropy_model, opts.seq_len, opts.batch, world))
    if world.is_main:
        print(json.dumps({"out": opts.out, **report}))
