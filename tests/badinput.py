"""The contract every bad input is held to, in one place: run `blt ARGS` as a user does (a real
child process), expect exit code 2, exactly one line on stderr starting with `blt <verb>: error:`,
no traceback, and every file that existed before byte-identical afterwards (nothing overwritten,
nothing half-written left behind where nothing was there).

The rows run in one warm child process (tests/answerer.py: blt's command line, as `python -m blt`
runs it, with a fresh working directory, environment and warnings for each row), which saves a
torch import per row; a row with its own environment, or fresh=True, gets a new process.
tests/e2e/test_answerer.py checks that both give the same answers."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snapshot(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file (and a marker for every dir) under `roots`."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.exists() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run_blt(
    *args, cwd: Path | None = None, env: dict | None = None, timeout: int = 300, stdin: bytes | None = None
) -> subprocess.CompletedProcess:
    """`python -m blt ARGS` in a child process; args may be str, Path or bytes (raw argv bytes)."""
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(
        [sys.executable, "-m", "blt", *argv],
        capture_output=True,
        cwd=cwd,
        timeout=timeout,
        input=stdin,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", **(env or {})},
    )


class Answerer:
    """The warm `blt` process (tests/answerer.py), started at its first row and kept for the session."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def run(self, args, cwd: Path | None, timeout: int) -> subprocess.CompletedProcess:
        """`blt ARGS` in `cwd`, answered by the warm process: its exit code, stdout and stderr bytes."""
        argv = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]  # raw bytes as sys.argv has them
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("answerer.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"},
            )
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd) if cwd else None}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:  # it hung or died: the next row starts a new one
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"`blt {' '.join(argv)}` gave no answer within {timeout} s (the warm process)")
        got = json.loads(line)
        return subprocess.CompletedProcess(
            ["blt", *argv], got["code"], got["stdout"].encode("latin-1"), got["stderr"].encode("latin-1")
        )


ANSWERER = Answerer()


def assert_user_error(
    args,
    watch=(),
    cwd: Path | None = None,
    env: dict | None = None,
    contains: str | None = None,
    timeout: int = 300,
    progress: tuple[str, ...] = (),
    fresh: bool = False,
) -> str:
    """Run `blt *args`; assert the one-line-error contract; returns the error line.

    watch: paths whose files must be byte-identical after the command (and nothing new appears
    under a watched dir). progress: prefixes of progress lines a job may print before its error
    (`blt train` resuming says which data it reuses before it reads the checkpoint). fresh: run it
    in a new process (as one with an `env` is) instead of the warm one."""
    args = list(args)
    verb = str(args[0])
    before = snapshot(*watch)
    if env is None and not fresh:
        proc = ANSWERER.run(args, cwd, timeout)
    else:
        proc = run_blt(*args, cwd=cwd, env=env, timeout=timeout)
    err = proc.stderr.decode("utf-8", errors="replace")
    lines = [ln for ln in err.splitlines() if ln.strip() and not (progress and ln.startswith(progress))]
    shown = f"`blt {' '.join(map(str, args))}` -> rc {proc.returncode}, stderr:\n{err}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in err, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith(f"blt {verb}: error: "), shown
    if contains is not None:
        assert contains.lower() in lines[0].lower(), shown
    after = snapshot(*watch)
    assert after == before, f"{shown}\nfiles changed: " + ", ".join(
        sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    )
    return lines[0]


def kill_midway(args, started, output: Path, env: dict | None = None, tries: int = 5) -> None:
    """Run `python -m blt ARGS` and kill -9 it once `started()` says it has written something;
    when it finishes first, remove `output` and try again. Fails the test if it never could."""
    import pytest

    for _ in range(tries):
        job = subprocess.Popen(
            [sys.executable, "-m", "blt", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        while job.poll() is None and not started():
            time.sleep(0.001)
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            job.wait()
            return
        shutil.rmtree(output)
    pytest.fail(f"`blt {args[0]}` always finished before it could be killed")
