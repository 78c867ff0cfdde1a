"""TCP ports on this machine: the check of the verbs that serve on one (`blt dashboard`, `blt serve`),
and a free one for a process group's rendezvous, a test's server or a benchmark's.

check_bindable("127.0.0.1", 8000)   # AddressError (one line naming the fix) if it cannot bind
port = free_port()                  # a port no one listens on now, on 127.0.0.1
"""

from __future__ import annotations

import errno
import socket

from blt.errors import UserError


class AddressError(UserError):
    """A --host or --port that cannot be served on; one-line message naming the fix."""


def check_bindable(host: str, port: int) -> None:
    """Bind (and release) host:port as the server will, so a bad --host or a taken --port is an
    AddressError naming the fix, not the server's own exit."""
    if not 0 <= port < 65536:
        raise AddressError(f"--port {port} is not a TCP port; use one from 1024 to 65535 (0: any free one)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise AddressError(
            f"--host {host} is not an address or name this machine can resolve ({e}); use --host 127.0.0.1"
        ) from None
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
            raise AddressError(f"cannot serve on {host}:{port} ({e.strerror}); {fix}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
