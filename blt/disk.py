"""Files and directories blt writes, made like any other file of the process, directories
created for a job that can be taken back if the job fails before it wrote anything of value, and
a lock file for what two processes must not write at once.

    write_safetensors(step_dir / "model.safetensors", model)   # mode 0666 & ~umask (0644 under 022)
    made = make_dirs(run_dir)                                  # the directories created, outermost first
    remove_made_dirs(made)                                     # takes them back while they are empty
    with file_lock(ckpts / ".step_00000100.lock", remove=True):  # waits for another holder
        ...
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(path: str | Path, weights, metadata: dict[str, str] | None = None) -> Path:
    """Write `weights` (a module, whose tied tensors are stored once, or a dict of tensors) as a
    .safetensors file with the mode a plain file gets (safetensors itself leaves 0600, which hides
    a shared checkpoint or export from the rest of a team)."""
    from safetensors.torch import save_file, save_model

    path = Path(path)
    if isinstance(weights, dict):
        save_file(weights, str(path), metadata=metadata)
    else:
        save_model(weights, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())
    return path


def make_dirs(path: str | Path) -> list[Path]:
    """`mkdir -p path`; returns the directories it created, outermost first (none if it existed)."""
    missing, p = [], Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            made.append(d)
    except OSError:
        remove_made_dirs(made)
        raise
    return made


def remove_made_dirs(made: list[Path]) -> None:
    """Remove directories make_dirs created, innermost first, stopping at the first that is not empty."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            return


class LockHeld(Exception):
    """file_lock(wait=False) found the lock held; `holder` says by whom ("pid N on HOST")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock (flock) on the file `path`, made if missing, for the body; it ends with
    the body or with the process, however that ends (kill -9 included). Another holder: wait for it,
    or with wait=False raise LockHeld. remove=True deletes the file when done; a process that was
    waiting on the deleted file locks the new one instead."""
    path = Path(path)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise LockHeld(holder) from None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()  # locked a file its holder deleted: lock the one at `path` now
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield
    finally:
        if remove:
            path.unlink(missing_ok=True)
        f.close()
