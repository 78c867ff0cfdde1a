"""`blt tokenizer train` as a user runs it: two processes writing one directory at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blt.subword import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PLAY = ROOT / "blt" / "data" / "shakespeare" / "train" / "tempest.txt"


def test_two_trainings_into_one_directory_at_once_leave_one_whole_tokenizer(tmp_path):
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "blt", "tokenizer", "train", str(PLAY), "--vocab", "500", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results  # the second rename onto a filled directory fails: that one refuses
    for code, stdout, stderr in results:
        if code == 0:
            assert json.loads(stdout)["out"] == str(out)
        else:
            assert "pass a new path" in stderr and len(stderr.strip().splitlines()) == 1
    assert load_tokenizer(out).get_vocab_size() == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary directory left behind
