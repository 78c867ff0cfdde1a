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
from datetime import timedelta
from pathlib import Path

from blt.data.documents import DataError
from blt.data.prepare import Settings, check_options, prepare
from blt.data.shards import Prepared
from blt.proc import launched, log
from blt.typed import PosInt, check_option


def _world():
    """This process's place in the job, with a gloo process group joined when there are several
    (the ranks only wait for each other; the entropy model runs on each rank's own device)."""
    import torch.distributed as td

    from blt.train.distributed import Dist

    p = launched()
    world = Dist(p.rank, p.world_size, p.local_rank, p.local_world_size)
    if p.world_size > 1 and not td.is_initialized():
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


def run(args) -> None:
    if args.seq_len is not None and args.seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {args.seq_len}")
    if not args.sources and not args.entropy_model:
        raise DataError("nothing to do: pass SOURCES to prepare and/or --entropy-model MODEL to compute entropies")
    check_option("batch", args.batch, PosInt, flag=True)
    settings = Settings(args.text_field, args.sample_by, args.val_fraction, args.seed)
    if args.sources:
        check_options(settings, args.workers, args.shard_mb, args.part)  # before a process group is joined
    world = _world()
    report: dict = {}
    if args.sources:

        def build():
            return prepare(
                args.sources,
                args.out,
                settings,
                workers=args.workers,
                part=args.part,
                shard_mb=args.shard_mb,
                progress=sys.stderr.isatty(),
                log=log,
            )

        manifest = world.on_main_first(build, share=True)
        if "shards" not in manifest:  # one part of several, not all done: no entropies yet
            print(json.dumps({"out": args.out, "part": manifest["part"], "of": manifest["of"]}))
            return
        report = {
            "out": args.out,
            "train_bytes": manifest["train"]["tokens"],
            "val_bytes": manifest["val"]["tokens"],
            "documents": manifest["train"]["docs"] + manifest["val"]["docs"],
            "shards": len(manifest["shards"]),
        }
    if args.entropy_model:
        report.update(compute_entropies(Path(args.out), args.entropy_model, args.seq_len or 1024, args.batch, world))
    if world.is_main:
        print(json.dumps({"out": args.out, **report}))
