"""`blt dashboard RUN_DIR`: TensorBoard on 127.0.0.1 over a run's (or a folder of runs') event
files, with no internet: no assets are fetched, nothing is uploaded.

    blt dashboard runs/tiny                 # prints http://127.0.0.1:6006/ ; Ctrl-C stops it
    blt dashboard runs --port 6010          # every run under runs/, side by side
"""

from __future__ import annotations

import contextlib
import errno
import io
import socket
import time
from pathlib import Path

from blt.errors import UserError


class DashboardError(UserError):
    """No event files to show, or an address or port it cannot serve on; one-line message."""


def check_bindable(host: str, port: int) -> None:
    """Bind (and release) host:port as TensorBoard will, so a bad --host or a taken --port is a
    DashboardError naming the fix, not TensorBoard's own exit."""
    if not 0 <= port < 65536:
        raise DashboardError(f"--port {port} is not a TCP port; use one from 1024 to 65535 (0: any free one)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise DashboardError(f"--host {host} is not an address or name this machine can resolve ({e}); "
                             "use --host 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                fix = "pick another --port"
            elif e.errno == errno.EACCES:
                fix = "ports below 1024 need root: pick --port 1024 or above"
            else:
                fix = "give --host an address of this machine, e.g. 127.0.0.1"
            raise DashboardError(f"cannot serve on {host}:{port} ({e.strerror}); {fix}") from None


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
    tb.configure(argv=[None, "--logdir", str(root), "--host", host, "--port", str(port),
                       "--reload_interval", "5"])
    said = io.StringIO()  # TensorBoard's start-up notes; its error, if it cannot start
    try:
        with contextlib.redirect_stderr(said):
            url = tb.launch()
    except (program.TensorBoardServerException, SystemExit) as e:
        why = str(e) if isinstance(e, program.TensorBoardServerException) else " ".join(said.getvalue().split())
        raise DashboardError(f"TensorBoard could not start on {host}:{port} ({why[:200]}); "
                             "pick another --port") from None
    print(f"TensorBoard for {path} at {url} (Ctrl-C stops it)", flush=True)
    while block:
        time.sleep(3600)
    return url
