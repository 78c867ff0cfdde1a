"""`blt serve MODEL`: load a run, checkpoint or export and serve it over HTTP with uvicorn.

    blt serve exports/tiny                                   # http://127.0.0.1:8000/v1
    blt serve runs/tiny --port 8001 --max-batch 16 --api-key "$KEY"

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=100, temperature=0.8, seed=0)

Ctrl-C stops taking new connections, lets running requests finish for up to `drain` seconds,
then cancels what is left (their clients get an error) and exits.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from blt.errors import require_extra
from blt.typed import OptionError, PosInt, check_option


def check_serve_options(
    max_batch: int, max_queue: int, max_tokens: int, drain: float, threads: int | None = None
) -> None:
    """The sizes, checked before anything is loaded (named as the CLI spells them)."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_tokens", max_tokens)):
        check_option(name, value, PosInt, flag=True)
    check_option("threads", threads, PosInt, optional=True, flag=True)
    if not 0 <= drain < float("inf"):
        raise OptionError(f"--drain must be a number of seconds >= 0, got {drain}")


def serve(
    path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_queue: int = 256,
    max_tokens: int = 4096,
    device: str = "cpu",
    api_key: str | None = None,
    name: str | None = None,
    drain: float = 5.0,
    threads: int | None = None,
) -> None:
    """Load the model at `path` and serve it until Ctrl-C (see the module docstring)."""
    check_serve_options(max_batch, max_queue, max_tokens, drain, threads)
    require_extra("serve", "fastapi", "uvicorn")
    from blt.evaluate import check_device
    from blt.net import check_bindable

    device = check_device(device, "--device")
    check_bindable(host, port)
    api_key = api_key if api_key is not None else os.environ.get("BLT_API_KEY") or None

    import torch
    import uvicorn

    from blt.artifacts import load_model
    from blt.serve.app import create_app
    from blt.serve.batcher import Batcher
    from blt.serve.protocol import Limits

    if threads is None and device == "cpu":  # leave a core to the HTTP side: spinning model threads
        threads = max(1, len(os.sched_getaffinity(0)) - 1)  # that share it slow both down many times
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_model(path, device)
    name = name or Path(path).resolve().name
    batcher = Batcher(loaded.model, loaded.patcher, loaded.cfg.data.seq_len, max_batch, max_queue)
    batcher.start()
    app = create_app(batcher, name, Limits(max_tokens=max_tokens, max_n=max_batch), api_key)
    print(
        f"blt serve: http://{host}:{port}/ serves '{name}' from {loaded.where} (OpenAI base URL "
        f"http://{host}:{port}/v1; batch {max_batch}, {torch.get_num_threads()} CPU threads, "
        f"{'bearer key required' if api_key else 'no key'}); Ctrl-C stops it",
        flush=True,
    )
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain + 5, log_level="info")
    try:
        _run(uvicorn, config, batcher, drain)
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
