"""`blt serve MODEL`: load a run, checkpoint or export and serve it over HTTP with uvicorn.

    blt serve exports/tiny                                   # http://127.0.0.1:8000/v1
    blt serve runs/tiny --port 8001 --max-batch 16 --api-key "$KEY"
    blt serve runs/tiny --kv-cache-mb 64 --max-batch 64       # paged KV caches: the batch bounded by memory
    serve(ServeOptions("runs/tiny", port=8001, max_batch=16))   # the same, from Python

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=100, temperature=0.8, seed=0)

Ctrl-C stops taking new connections, lets running requests finish for up to `drain` seconds,
then cancels what is left (their clients get an error) and exits.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from blt.errors import require_extra
from blt.typed import PosFloat, PosInt, Range, check_fields

TYPICAL_ROW = 256  # bytes of a typical row (prompt and completion) for the startup line's count


@dataclass(frozen=True)
class ServeOptions:
    """What `blt serve` takes, named as its flags are; serve() checks each (one line naming the
    flag) before anything is loaded."""

    checkpoint: str  # run dir, checkpoint dir or export dir
    host: str = "127.0.0.1"  # address to bind (default: this machine only)
    port: int = 8000  # 0: any free port; blt.net.check_bindable checks the range and binds it once
    max_batch: PosInt = 16  # sequences generated together, at most
    max_queue: PosInt = 256  # sequences waiting for the batch; more: HTTP 429
    max_tokens: PosInt = 4096  # the most bytes one request may ask for
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto (blt.device.check_device)
    api_key: str | None = None  # require 'Authorization: Bearer KEY'; None: $BLT_API_KEY if set
    name: str | None = None  # the model's name in the API; None: the checkpoint dir's name
    drain: Annotated[float, Range(ge=0, says="a number of seconds >= 0")] = 5.0  # Ctrl-C lets requests finish
    threads: PosInt | None = None  # CPU threads for the model; None on CPU: one fewer than the cores
    kv_cache_mb: PosFloat | None = None  # paged KV caches of this many MB in all; None: the whole context per row


def serve(opts: ServeOptions) -> None:
    """Load the model at `opts.checkpoint` and serve it until Ctrl-C (see the module docstring)."""
    opts = check_fields(opts, flag=True)
    require_extra("serve", "fastapi", "uvicorn")
    from blt.device import check_device
    from blt.net import check_bindable

    device = check_device(opts.device, "--device")
    check_bindable(opts.host, opts.port)
    api_key = opts.api_key if opts.api_key is not None else os.environ.get("BLT_API_KEY") or None

    import torch
    import uvicorn

    from blt.artifacts import load_model
    from blt.serve.app import create_app
    from blt.serve.batcher import Batcher
    from blt.serve.protocol import Limits

    threads = opts.threads
    if threads is None and device == "cpu":  # leave a core to the HTTP side: spinning model threads
        threads = max(1, len(os.sched_getaffinity(0)) - 1)  # that share it slow both down many times
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_model(opts.checkpoint, device)
    name = opts.name or Path(opts.checkpoint).resolve().name
    context = loaded.cfg.data.seq_len
    batcher = Batcher(loaded.model, loaded.patcher, context, opts.max_batch, opts.max_queue, opts.kv_cache_mb)
    batcher.start()
    app = create_app(batcher, name, Limits(max_tokens=opts.max_tokens, max_n=opts.max_batch), api_key)
    url = f"{opts.host}:{opts.port}"
    print(
        f"blt serve: http://{url}/ serves '{name}' from {loaded.where} (OpenAI base URL "
        f"http://{url}/v1; batch {opts.max_batch}, {torch.get_num_threads()} CPU threads, "
        f"{'bearer key required' if api_key else 'no key'}); Ctrl-C stops it",
        flush=True,
    )
    if batcher.pools is not None:
        pools, typical = batcher.pools, min(TYPICAL_ROW, context)
        print(
            f"blt serve: KV cache {opts.kv_cache_mb:g} MB, paged in blocks of {pools.block_size} positions: it "
            f"holds {pools.rows_at(context)} rows at the full context ({context} bytes), {pools.rows_at(typical)} "
            f"at {typical} bytes (--max-batch {opts.max_batch} caps the batch); prompts up to "
            f"{pools.limit - 1} bytes",
            flush=True,
        )
    config = uvicorn.Config(
        app, host=opts.host, port=opts.port, timeout_graceful_shutdown=opts.drain + 5, log_level="info"
    )
    try:
        _run(uvicorn, config, batcher, opts.drain)
    finally:
        batcher.stop()


def _run(uvicorn, config, batcher, drain: float) -> None:
    """uvicorn's server, except that the first Ctrl-C (or SIGTERM) also starts a `drain`-second
    timer that then cancels the batcher's rows: their streams end with an error event and their
    connections close, so uvicorn's graceful shutdown finishes instead of cutting them off."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                threading.Timer(drain, batcher.stop).start()
            super().handle_exit(sig, frame)

    Server(config).run()
