"""`blt dashboard RUN_DIR`: TensorBoard on 127.0.0.1 over a run's (or a folder of runs') event
files, with no internet: no assets are fetched, nothing is uploaded.

    blt dashboard runs/tiny                 # prints http://127.0.0.1:6006/ ; Ctrl-C stops it
    blt dashboard runs --port 6010          # every run under runs/, side by side
"""

from __future__ import annotations

import time
from pathlib import Path

from blt.errors import UserError


class DashboardError(UserError):
    """No event files to show, or the port is taken; one-line message."""


def serve(path: str | Path, port: int = 6006, host: str = "127.0.0.1", block: bool = True) -> str:
    """Start TensorBoard over `path`; returns its URL (blocks until Ctrl-C when `block`)."""
    root = Path(path)
    if not root.exists():
        raise DashboardError(f"'{root}' not found (give a run directory, e.g. runs/tiny)")
    if not any(root.rglob("events.out.tfevents.*")):
        raise DashboardError(f"no TensorBoard event files under '{root}' (train with logging.tensorboard=true)")
    if (root / "tensorboard").is_dir():  # one run: its scalars are the run "."
        root = root / "tensorboard"
    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", str(root), "--host", host, "--port", str(port),
                       "--reload_interval", "5"])
    try:
        url = tb.launch()
    except program.TensorBoardServerException as e:
        raise DashboardError(f"TensorBoard could not start on {host}:{port} ({e}); pick another --port") from None
    print(f"TensorBoard for {path} at {url} (Ctrl-C stops it)", flush=True)
    while block:
        time.sleep(3600)
    return url
