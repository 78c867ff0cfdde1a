"""A warm `blt` process for the bad-input contract (tests/badinput.py): it answers one request per
line on stdin, {"argv": [...], "cwd": DIR}, by running blt's command line as `python -m blt ARGV`
would in DIR, and replies on its own pipe with the exit code and what went to file descriptors 1
and 2 (a traceback for an uncaught exception, as the interpreter prints one). Between requests it
puts back the working directory, the environment, the warning filters and their once-only
registries, so each row starts as a fresh process would; the rows of a bad-input table share one
torch import instead of paying one each.

    python tests/answerer.py    # started by badinput.Answerer; not for people
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
import warnings


def _fresh_warnings(filters: list) -> None:
    """Warnings as a new process has them: its filters, and nothing yet shown once."""
    warnings.filters[:] = filters
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()
    warnings._filters_mutated()


def _run(argv: list[str]) -> int:
    from blt.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse, sys.exit: the status the interpreter would exit with
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # what the interpreter prints for an uncaught exception, and its status
        traceback.print_exc()
        return 1


def serve() -> None:
    reply = os.fdopen(os.dup(1), "w")
    requests = os.fdopen(os.dup(0), "r")
    quiet = os.open(os.devnull, os.O_RDONLY)
    os.dup2(quiet, 0)  # the rows read no stdin
    home, env, filters = os.getcwd(), dict(os.environ), list(warnings.filters)
    for line in requests:
        req = json.loads(line)
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            _fresh_warnings(filters)
            os.chdir(req["cwd"] or home)
            code = _run(req["argv"])
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            os.chdir(home)
            os.environ.clear()
            os.environ.update(env)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("latin-1"))  # bytes as code points: the parent gets them back exactly
            f.close()
        reply.write(json.dumps({"code": code, "stdout": texts[0], "stderr": texts[1]}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
