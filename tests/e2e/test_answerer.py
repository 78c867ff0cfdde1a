"""The warm process that answers the bad-input rows (tests/answerer.py) answers as a fresh
`python -m blt` does: the same exit code, stdout and stderr, byte for byte, for errors of every
kind (usage, config, option, a non-UTF-8 argument), a success, and a row after a row that changed
the process's environment or working directory."""

from __future__ import annotations

import pytest

from badinput import ANSWERER, run_blt
from conftest import CONFIGS

TINY = CONFIGS / "tiny.yaml"
ROWS = [
    pytest.param(["generate"], id="usage"),
    pytest.param(["train", "missing.yaml"], id="config-missing"),
    pytest.param(["train", TINY, "training.stepz=3"], id="config-key"),
    pytest.param(["plan", TINY, "--gpu-mem-gb", "nan"], id="option"),
    pytest.param([b"train", b"caf\xe9.yaml"], id="non-utf8-argument"),
    pytest.param(["info", TINY, "model.global_model.layers=2"], id="success"),
    pytest.param(["info", TINY, "--local_rank=3", "model.global_model.layers=2"], id="old-launcher-argument"),
]


@pytest.mark.parametrize("args", ROWS)
def test_the_warm_process_answers_as_a_fresh_one(tmp_path, args):
    fresh = run_blt(*args, cwd=tmp_path)
    for _ in range(2):  # and again, after a row that may have changed its state
        warm = ANSWERER.run(args, tmp_path, timeout=120)
        assert (warm.returncode, warm.stdout, warm.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert list(tmp_path.iterdir()) == []
