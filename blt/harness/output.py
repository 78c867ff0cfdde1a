"""`blt lm-eval --output FILE`: the place is checked before anything is evaluated (by creating the
file's temporary twin beside it), and the results are written atomically: a reader sees the old
file or the whole new one. An existing FILE is replaced, as lm-eval's own --output_path does and
as the user asked; a symlink is written through, and /dev/null or a pipe is written in place.

    with results_file(args.output) as write:   # a bad place: one line, before the evaluation
        results = evaluate(...)                 # slow
        write(results)                          # FILE whole, or untouched
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from blt.disk import umask
from blt.errors import UserError


class OutputError(UserError):
    """--output names a place that cannot take the results; one line naming the fix."""


@contextlib.contextmanager
def results_file(path: str | None, flag: str = "--output"):
    """Yields write(results); without a path, write does nothing. The temporary file is removed
    whatever happens before write finishes (an error, Ctrl-C)."""
    if path is None:
        yield lambda results: None
        return
    given = Path(path)
    if given.exists() and not given.is_file() and not given.is_dir():  # /dev/null, a named pipe
        if not os.access(given, os.W_OK):
            raise OutputError(f"{flag} '{path}' is not writable; give a file path in a writable directory")
        yield lambda results: given.write_text(_dumps(results), encoding="utf-8")
        return
    target = Path(os.path.realpath(given)) if given.is_symlink() else given
    if target.is_dir():
        raise OutputError(f"{flag} '{path}' is a directory; give a file path, e.g. {flag} {given / 'results.json'}")
    folder = target.parent.absolute()
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    except FileNotFoundError:
        raise OutputError(
            f"{flag} '{path}': the directory '{folder}' does not exist; create it first or give another path"
        ) from None
    except NotADirectoryError:
        raise OutputError(f"{flag} '{path}': '{folder}' is not a directory; give a file path in a directory") from None
    except OSError as e:
        raise OutputError(
            f"{flag} '{path}': cannot write in '{folder}' ({e.strerror}); give a path in a writable directory"
        ) from None
    os.close(fd)
    mode = target.stat().st_mode & 0o7777 if target.is_file() else 0o666 & ~umask()  # as `>` would leave it

    def write(results: dict) -> None:
        try:
            Path(tmp).write_text(_dumps(results), encoding="utf-8")
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except OSError as e:
            raise OutputError(
                f"could not write {flag} '{path}' ({e.strerror}); give a path with free space in a writable directory"
            ) from None

    try:
        yield write
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _dumps(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable)
