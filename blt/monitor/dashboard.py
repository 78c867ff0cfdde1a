"""`blt dashboard RUN_DIR`: TensorBoard on 127.0.0.1 over a run's (or a folder of runs') event
files, with no internet: no assets are fetched, nothing is uploaded.

    blt dashboard runs/tiny                 # prints http://127.0.0.1:6006/ ; Ctrl-C stops it
    blt dashboard runs --port 6010          # every run under runs/, side by side
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

from blt.errors import UserError
from blt.net import check_bindable


class DashboardError(UserError):
    """No event files to show, or TensorBoard could not start; one-line message."""


def serve(path: str | Path, port: int = 6006, host: str = "127.0.0.1", block: bool = True) -> str:
    """Start TensorBoard over `path`; returns its URL (blocks until Ctrl-C when `block`)."""
    root = Path(path)
    if not root.exists():
        raise DashboardError(f"'{root}' not found (give a run directory, e.g. runs/tiny)")
    if not any(root.rglob("events.out.tfevents.*")):
        raise DashboardError(f"no TensorBoard event files under '{root}' (train with logging.tensorboard=true)")
    if (root / "tensorboard").is_dir():  # one run: its scalars are the run "."
        root = root / "tensorboard"
    check_bindable(host, port)
    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", str(root), "--host", host, "--port", str(port), "--reload_interval", "5"])
    said = io.StringIO()  # TensorBoard's start-up notes; its error, if it cannot start
    try:
        with contextlib.redirect_stderr(said):
            url = tb.launch()
    except (program.TensorBoardServerException, SystemExit) as e:
        why = str(e) if isinstance(e, program.TensorBoardServerException) else " ".join(said.getvalue().split())
        raise DashboardError(
            f"TensorBoard could not start on {host}:{port} ({why[:200]}); pick another --port"
        ) from None
    print(f"TensorBoard for {path} at {url} (Ctrl-C stops it)", flush=True)
    while block:
        time.sleep(3600)
    return url
