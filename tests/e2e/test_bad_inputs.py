"""Bad input fails cleanly: exit code 2, one stderr line `blt VERB: error: ...` that names the
problem and the fix, no traceback, nothing written. Each row runs the real CLI in a child process
through tests/badinput.py; a few rows check the Python API the same values go through.

Sections: config (`blt train`), generate, eval, patch, plan, a closed stdout. Keep new sections
(e.g. checkpoint loading) in the same shape: a table of rows, one test function that runs it.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from blt.errors import UserError

from badinput import ROOT, assert_user_error, run_blt
from conftest import CONFIGS, TINY_BLT

TINY = CONFIGS / "tiny.yaml"
# a device this machine lacks: plain cuda on a CPU-only torch, else a GPU number past the last
MISSING_CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"


# ----------------------------------------------------------------------------- config (blt train)

BAD_OVERRIDES = [  # space-separated overrides (the last word wins), part of the one-line message
    # out of range: before the range table some crashed with a torch traceback, some trained anyway
    # (eval.max_bytes=0 trained every step and then crashed; checkpoint.every=0 divided by zero)
    pytest.param("optimizer.lr=-1", "'optimizer.lr' must be > 0, got -1.0", id="lr-negative"),
    pytest.param("optimizer.lr=.nan", "'optimizer.lr' must be a finite number, got nan", id="lr-nan"),
    pytest.param(
        "training.max_minutes=.inf", "'training.max_minutes' must be a finite number or null", id="max_minutes-inf"
    ),
    pytest.param("optimizer.eps=-1", "'optimizer.eps' must be > 0", id="eps-negative"),
    pytest.param("optimizer.betas=[0.9,2]", "'optimizer.betas[1]' must be in [0, 1), got 2.0", id="beta-2"),
    pytest.param("optimizer.betas=[0.9]", "optimizer.betas must be a list of two floats", id="betas-one"),
    pytest.param("optimizer.weight_decay=-1", "'optimizer.weight_decay' must be >= 0", id="weight_decay-negative"),
    pytest.param("optimizer.grad_clip=-1", "'optimizer.grad_clip' must be >= 0", id="grad_clip-negative"),
    pytest.param("model.init_std=-1", "'model.init_std' must be > 0", id="init_std-negative"),
    pytest.param("model.dropout=1", "'model.dropout' must be in [0, 1), got 1.0", id="dropout-1"),
    pytest.param("model.rope_theta=0", "'model.rope_theta' must be > 0", id="rope_theta-0"),
    pytest.param("model.global_model.heads=0", "'model.global_model.heads' must be >= 1", id="heads-0"),
    pytest.param("model.encoder.window=0", "'model.encoder.window' must be >= 1 or null", id="window-0"),
    pytest.param("model.hash_ngram_sizes=[3,0]", "'model.hash_ngram_sizes[1]' must be >= 1", id="ngram-0"),
    pytest.param("patching.patch_size=0", "'patching.patch_size' must be >= 1", id="patch_size-0"),
    pytest.param("data.seq_len=1", "'data.seq_len' must be >= 2", id="seq_len-1"),
    pytest.param("training.threads=-1", "'training.threads' must be >= 0", id="threads-negative"),
    pytest.param("training.seed=-1", "'training.seed' must be in [0, 2**32)", id="seed-negative"),
    pytest.param("schedule.warmup_steps=-1", "'schedule.warmup_steps' must be >= 0", id="warmup-negative"),
    pytest.param("schedule.min_lr_ratio=-1", "'schedule.min_lr_ratio' must be in [0, 1]", id="min_lr_ratio-negative"),
    pytest.param("eval.every=-1", "'eval.every' must be >= 0", id="eval_every-negative"),
    pytest.param("eval.max_bytes=0", "'eval.max_bytes' must be >= 1 or null, got 0", id="eval_max_bytes-0"),
    pytest.param("eval.batch_size=0", "'eval.batch_size' must be >= 1", id="eval_batch_size-0"),
    pytest.param("checkpoint.every=0", "'checkpoint.every' must be >= 1", id="checkpoint_every-0"),
    pytest.param("logging.every=0", "'logging.every' must be >= 1", id="logging_every-0"),
    # already refused before the range table: unknown key, wrong type, bad override syntax
    pytest.param("training.stepz=3", "did you mean 'training.steps'", id="unknown-key"),
    pytest.param("training.steps=many", "'training.steps' must be int, got 'many'", id="wrong-type"),
    pytest.param("patching.mode=entropie", "'patching.mode' must be one of", id="wrong-choice"),
    pytest.param("training=3", "'training' must be a mapping", id="section-not-a-mapping"),
    pytest.param("nonsense", "not of the form key=value", id="override-without-equals"),
    pytest.param("=3", "has an empty key", id="override-empty-key"),
    # checks across fields
    pytest.param("model.encoder.dim=33", "must be a positive multiple of model.encoder.heads", id="dim-not-multiple"),
    pytest.param("model.decoder.dim=64", "must equal model.encoder.dim", id="decoder-dim"),
    pytest.param("model.hf_compat=true", "patching.split_first_byte=true", id="hf_compat-needs-split"),
    pytest.param(
        "patching.mode=entropy patching.entropy_model=null", "needs patching.entropy_model", id="entropy-needs-model"
    ),
    pytest.param("model.global_model.sparse.attention=bidirectional", "causal attention", id="sparse-bidirectional"),
    pytest.param("distributed.zero_stage=4", "zero_stage must be 0, 1, 2 or 3", id="zero_stage-4"),
    pytest.param(
        "training.device=cuda",
        "training.device=cuda but no CUDA device is visible",
        id="device-missing",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible"),
    ),
    # FlexAttention has no CPU backward: an 81-line traceback from inside the first step before
    pytest.param(
        "training.device=cpu model.global_model.sparse.pattern=local model.global_model.sparse.backend=flex",
        "set model.global_model.sparse.backend=gather",
        id="flex-on-cpu-global",
    ),
    pytest.param(
        "training.device=cpu model.decoder.window=null model.decoder.sparse.pattern=local "
        "model.decoder.sparse.backend=flex",
        "set model.decoder.sparse.backend=gather",
        id="flex-on-cpu-decoder",
    ),
    # a learned target no patch can reach (1e9 trained with a ratio loss of 2e8 before)
    pytest.param(
        "patching.mode=learned patching.target_patch_size=1e9",
        "patching.target_patch_size (1e+09) must be <= patching.max_patch_length (12)",
        id="learned-target-1e9",
    ),
    pytest.param(
        "patching.mode=learned patching.target_patch_size=13",
        "target_patch_size (13) must be <= patching.max_patch_length (12)",
        id="learned-target-above-max",
    ),
]


def train_args(config, tmp_path, cache_dir, *overrides) -> list:
    """A quick tiny run (so that a row wrongly accepted fails fast), the row's overrides last."""
    return [
        "train",
        config,
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={cache_dir}",
        *TINY_BLT,
        "patching.mode=static",
        "training.steps=1",
        *overrides,
    ]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES)
def test_bad_config_value_fails_before_anything_is_written(tmp_path, cache_dir, overrides, message):
    assert_user_error(train_args(TINY, tmp_path, cache_dir, *overrides.split()), watch=[tmp_path], contains=message)
    assert not (tmp_path / "run").exists()


BAD_FILES = [  # file name, contents (None: not created, "dir": a directory; not a key of TINY_BLT), message
    pytest.param("missing.yaml", None, "not found", id="missing-file"),
    pytest.param("configs", "dir", "is a directory", id="directory"),
    pytest.param("unclosed.yaml", b"training: {steps: 1\n", "not valid YAML at line 2", id="invalid-yaml"),
    pytest.param("date.yaml", b"name: 2024-13-01\n", "not valid YAML", id="impossible-date"),
    pytest.param(
        "random.bin",
        bytes(random.Random(0).randrange(256) for _ in range(4096)),
        "is not a UTF-8 text file",
        id="random-bytes",
    ),
    pytest.param("list.yaml", b"- 1\n- 2\n", "must hold a mapping at the top level", id="top-level-list"),
    pytest.param(
        "section.yaml",
        b"checkpoint: 3\n",
        "'checkpoint' must be a mapping of CheckpointConfig fields",
        id="section-of-wrong-type",
    ),
    pytest.param(
        "betas.yaml",
        b"optimizer: {betas: 0.9}\n",
        "'optimizer.betas' must be list[float], got 0.9",
        id="value-of-wrong-type",
    ),
    pytest.param(
        "nested.yaml",
        b"model: {decoder: {sparse: {block: [1, 2]}}}\n",
        "'model.decoder.sparse.block' must be int",
        id="nested-value-of-wrong-type",
    ),
    pytest.param("nan.yaml", b"optimizer: {lr: .nan}\n", "'optimizer.lr' must be a finite number", id="yaml-nan"),
    pytest.param(
        "inf.yaml", b"model: {norm_eps: -.inf}\n", "'model.norm_eps' must be a finite number", id="yaml-minus-inf"
    ),
]


@pytest.mark.parametrize("name,contents,message", BAD_FILES)
def test_bad_config_file_fails_before_anything_is_written(tmp_path, cache_dir, name, contents, message):
    path = tmp_path / name
    if contents == "dir":
        path.mkdir()
    elif contents is not None:
        path.write_bytes(contents)
    assert_user_error(train_args(path, tmp_path, cache_dir), watch=[tmp_path], contains=message)
    assert not (tmp_path / "run").exists()


def test_a_program_given_as_the_config_is_one_line(tmp_path):
    """`blt train /bin/ls`: a binary file was a UnicodeDecodeError traceback."""
    assert_user_error(
        ["train", sys.executable, f"run_dir={tmp_path / 'run'}"], watch=[tmp_path], contains="is not a UTF-8 text file"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        pytest.param(["train"], "the following arguments are required: config", id="no-config"),
        pytest.param(["train", TINY, "--bogus"], "unrecognized arguments: --bogus", id="unknown-option"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, args, message):
    assert_user_error(args, watch=[tmp_path], cwd=tmp_path, contains=message)


# ----------------------------------------------------------------------------- generate


@pytest.fixture
def run(static_run):
    """The session's tiny BLT (tests/conftest.py, trained once by the real CLI), shared by the
    generate, eval and patch rows; every row watches it stay byte-identical."""
    return static_run


BAD_GENERATE = [  # arguments after the run dir, part of the message
    pytest.param(["--temperature", "nan"], "--temperature must be a finite number, got nan", id="temperature-nan"),
    pytest.param(["--temperature", "inf"], "--temperature must be a finite number, got inf", id="temperature-inf"),
    pytest.param(["--temperature", "-1"], "--temperature must be >= 0, got -1.0", id="temperature-negative"),
    # logits / T overflowed float32 and every byte came out 0xFF
    pytest.param(
        ["--temperature", "1e-45"],
        "--temperature must be 0 (greedy) or >= 0.001, got 1e-45",
        id="temperature-underflow",
    ),
    pytest.param(["--temperature", "1e-300"], "--temperature must be 0 (greedy) or >= 0.001", id="temperature-1e-300"),
    pytest.param(["--top-p", "2"], "--top-p must be in (0, 1], got 2.0", id="top_p-2"),
    pytest.param(["--top-p", "0"], "--top-p must be in (0, 1], got 0.0", id="top_p-0"),
    pytest.param(["--top-k", "0"], "--top-k must be >= 1, got 0", id="top_k-0"),
    pytest.param(["--top-k", "-3"], "--top-k must be >= 1, got -3", id="top_k-negative"),
    pytest.param(["--top-k", "2.5"], "argument --top-k: invalid int value: '2.5'", id="top_k-not-int"),
    pytest.param(["--max-bytes", "-5"], "--max-bytes must be >= 0, got -5", id="max_bytes-negative"),
    pytest.param(["--seed", "-1"], "--seed must be in [0, 2**32)", id="seed-negative"),
    pytest.param(["--device", "foo"], "--device 'foo' is not a device", id="device-unknown"),
    pytest.param(["--device", MISSING_CUDA], f"--device {MISSING_CUDA}: ", id="device-missing"),
]


@pytest.mark.parametrize("args,message", BAD_GENERATE)
def test_bad_generate_option_is_one_line(run, args, message):
    assert_user_error(["generate", run, "--prompt", "a", *args], watch=[run], contains=message)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([b"--prompt", b"ab\xc3"], id="prompt-ends-mid-character"),
        pytest.param([b"--prompt", b"\xff"], id="prompt-invalid-byte"),
        pytest.param([b"--prompt", b"\xff", b"--no-cache", b"--stop", b"\xfe"], id="prompt-invalid-byte-no-cache"),
        pytest.param([b"--prompt", b"\xff", b"--prompt", b"ab\xc3", b"--json"], id="prompts-invalid-json"),
    ],
)
def test_prompt_that_is_not_utf8_generates_valid_utf8(run, args):
    """argv bytes that are not UTF-8 were a UnicodeEncodeError traceback; now they are the prompt's
    bytes, and the output is valid UTF-8 (undecodable bytes shown as U+FFFD)."""
    proc = run_blt("generate", run, *args, "--max-bytes", "8")
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    out = proc.stdout.decode("utf-8")  # strict: valid UTF-8, never half a character
    if b"--json" in args:
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["prompt"] for r in rows] == ["\ufffd", "ab\ufffd"]
    else:
        assert out.startswith("ab" if args[1] == b"ab\xc3" else "\ufffd")


def test_generator_api_refuses_bad_options_before_sampling(run):
    """The Python API checks the same ranges (the same function) and names the options as Python
    spells them; the error is a UserError (a ValueError) raised by stream() itself."""
    from blt.generation import Generator

    gen = Generator.load(str(run))
    for opts, message in [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": 1e-45}, "temperature must be 0 (greedy) or >= 0.001"),
        ({"top_p": 2.0}, "top_p must be in (0, 1]"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"max_bytes": -5}, "max_bytes must be >= 0"),
        ({"max_bytes": 2.5}, "max_bytes must be int"),
        ({"seed": -1}, "seed must be in [0, 2**32)"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            gen.stream(["a"], **opts)  # no iteration needed
    with pytest.raises(ValueError, match="prompt 0 holds"):
        gen.stream(["\ud800"])  # a lone surrogate that no bytes encode
    with pytest.raises(TypeError, match="stop must be a list"):
        gen.stream(["a"], stop="\n")
    with pytest.raises(UserError, match="device 'foo' is not a device"):
        Generator.load(str(run), device="foo")
    # argv-style str (surrogate escapes) and bytes are the same prompt; max_bytes=0 generates nothing
    assert gen.generate([os.fsdecode(b"ab\xc3")], max_bytes=6) == gen.generate([b"ab\xc3"], max_bytes=6)
    assert gen.generate(["hi"], max_bytes=0) == [b""] and gen.generate([]) == []


# ----------------------------------------------------------------------------- eval


BAD_EVAL = [  # arguments after the run dir (EMPTY: an empty data file), part of the message
    pytest.param(["--max-bytes", "0"], "--max-bytes must be >= 1, got 0", id="max_bytes-0"),
    pytest.param(["--max-bytes", "-5"], "--max-bytes must be >= 1, got -5", id="max_bytes-negative"),
    pytest.param(["--batch-size", "0"], "--batch-size must be >= 1, got 0", id="batch_size-0"),
    pytest.param(["--device", "foo"], "--device 'foo' is not a device", id="device-unknown"),
    pytest.param(["--device", MISSING_CUDA], f"--device {MISSING_CUDA}: ", id="device-missing"),
    pytest.param(["--data", "missing.txt"], "'missing.txt' matches no file", id="data-missing"),
    pytest.param(["--data", "EMPTY"], "holds no text", id="data-empty"),
]


@pytest.mark.parametrize("args,message", BAD_EVAL)
def test_bad_eval_option_is_one_line(run, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    assert_user_error(["eval", run, *args], watch=[run, tmp_path], cwd=tmp_path, contains=message)


def test_evaluate_api_refuses_bad_sizes(run):
    from blt.evaluate import evaluate
    from blt.generation import Generator

    gen = Generator.load(str(run))
    tokens = np.arange(4, 200, dtype=np.uint16)
    with pytest.raises(UserError, match="batch_size must be >= 1, got 0"):
        evaluate(gen.model, gen.patcher, tokens, 64, batch_size=0)
    with pytest.raises(UserError, match="max_bytes must be >= 1, got 0"):
        evaluate(gen.model, gen.patcher, tokens, 64, batch_size=2, max_bytes=0)


# ----------------------------------------------------------------------------- patch


BAD_PATCH = [  # arguments after the run dir (DIR: a directory), part of the message
    pytest.param([], "one of the arguments --text --file is required", id="no-text"),
    pytest.param(["--text", "a", "--file", "x.txt"], "not allowed with argument", id="text-and-file"),
    pytest.param(["--file", "missing.txt"], "cannot read 'missing.txt' (No such file or directory)", id="file-missing"),
    pytest.param(["--file", "DIR"], "(Is a directory)", id="file-is-a-directory"),
]


@pytest.mark.parametrize("args,message", BAD_PATCH)
def test_bad_patch_option_is_one_line(run, tmp_path, args, message):
    args = [str(tmp_path) if a == "DIR" else a for a in args]
    assert_user_error(["patch", run, *args], watch=[run, tmp_path], cwd=tmp_path, contains=message)


# ----------------------------------------------------------------------------- plan


BAD_PLAN = [  # arguments after the config, part of the message ("budget nan GB" and exit 0 before)
    pytest.param(["--gpu-mem-gb", "nan"], "--gpu-mem-gb must be a finite number, got nan", id="gpu_mem-nan"),
    pytest.param(["--gpu-mem-gb", "inf"], "--gpu-mem-gb must be a finite number, got inf", id="gpu_mem-inf"),
    pytest.param(["--gpu-mem-gb", "-5"], "--gpu-mem-gb must be > 0, got -5.0", id="gpu_mem-negative"),
    pytest.param(["--gpu-mem-gb", "0"], "--gpu-mem-gb must be > 0, got 0.0", id="gpu_mem-0"),
    pytest.param(["--nodes", "0"], "--nodes must be >= 1, got 0", id="nodes-0"),
    pytest.param(["--procs-per-node", "-1"], "--procs-per-node must be >= 1, got -1", id="procs-negative"),
]


@pytest.mark.parametrize("args,message", BAD_PLAN)
def test_bad_plan_option_is_one_line(tmp_path, args, message):
    assert_user_error(["plan", TINY, *args], watch=[tmp_path], cwd=tmp_path, contains=message)


# ----------------------------------------------------------------------------- a reader that leaves early


CLOSED_PIPE = [  # arguments after the run dir (LONG: a 120 KB text file), bytes read before closing the pipe
    pytest.param(["generate", "--prompt", "ROMEO.", "--max-bytes", "3000"], 10, id="generate-stream"),
    pytest.param(["generate", "--prompt", "a", "--prompt", "b", "--max-bytes", "20"], 0, id="generate-json-lines"),
    pytest.param(["patch", "--file", "LONG"], 10, id="patch"),
]


@pytest.mark.parametrize("args,read", CLOSED_PIPE)
def test_a_reader_that_leaves_early_ends_the_command_quietly(run, tmp_path, args, read):
    """`blt generate ... | head -c 10` (and JSON lines, and `blt patch ... | head`) was a
    BrokenPipeError traceback and exit 1; now the command ends quietly with 141, the status a
    shell reports for a tool that SIGPIPE ended (`yes | head`)."""
    long = tmp_path / "long.txt"
    long.write_bytes(b"To be, or not to be, that is the question.\n" * 2800)  # its output overfills a pipe
    verb, *rest = [str(long) if a == "LONG" else a for a in args]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blt", verb, str(run), *rest],
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        got = proc.stdout.read(read) if read else b""
        proc.stdout.close()  # the reader leaves (what head does after its bytes)
        code = proc.wait(timeout=300)
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    assert len(got) == read and "Traceback" not in stderr and "Error" not in stderr, stderr
    assert code == 141, stderr
