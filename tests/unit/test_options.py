"""A verb's options are a dataclass checked as the config is (blt/typed.py): its parser and its
dataclass name the same flags, a flag left out takes the dataclass's default (for `blt prepare`'s
data settings, the data config's), and a bad value is one line naming the flag."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from pathlib import Path

import pytest

from blt.cli import build_parser
from blt.config import DataConfig
from blt.evaluate import EvalOptions
from blt.proc import Place
from blt.serve.server import ServeOptions
from blt.train.distributed import Dist, launched_world
from blt.train.prepare_job import PrepareOptions
from blt.typed import OptionError, check_fields, from_args

VERBS = {"serve": ServeOptions, "prepare": PrepareOptions, "eval": EvalOptions}
ROOT = Path(__file__).resolve().parents[2]


def verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


@pytest.mark.parametrize("verb", VERBS)
def test_each_flag_of_a_verb_is_a_field_of_its_options(verb):
    flags = {a.dest for a in verb_parser(verb)._actions if a.dest not in ("help", "func")}
    assert flags == {f.name for f in dataclasses.fields(VERBS[verb])}


@pytest.mark.parametrize("verb, argv", [("serve", ["m"]), ("prepare", ["a.txt", "--out", "o"]), ("eval", ["m"])])
def test_a_flag_left_out_takes_the_dataclass_default(verb, argv):
    cls = VERBS[verb]
    given = from_args(cls, build_parser().parse_args([verb, *argv]))
    required = {f.name: getattr(given, f.name) for f in dataclasses.fields(cls) if f.name in ("checkpoint", "out")}
    assert given == cls(**required, **({"sources": ["a.txt"]} if verb == "prepare" else {}))


def test_prepare_without_data_flags_prepares_as_the_data_config_does():
    opts = from_args(PrepareOptions, build_parser().parse_args(["prepare", "a.txt", "--out", "o"]))
    data = DataConfig()
    assert (opts.text_field, opts.sample_by, opts.val_fraction, opts.seed, opts.seq_len) == (
        data.text_field,
        data.sample_by,
        data.val_fraction,
        data.seed,
        data.seq_len,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_batch": 0}, "--max-batch must be >= 1, got 0"),
        ({"threads": 0}, "--threads must be >= 1, got 0"),  # an optional field: its rule alone, no "or null"
        ({"drain": math.nan}, "--drain must be a number of seconds >= 0, got nan"),  # Range(says=...)
        ({"drain": math.inf}, "--drain must be a number of seconds >= 0, got inf"),
        ({"drain": -1.0}, "--drain must be a number of seconds >= 0, got -1.0"),
        ({"max_queue": 2.5}, "--max-queue must be int, got 2.5"),
    ],
)
def test_a_bad_serve_option_names_its_flag(change, message):
    with pytest.raises(OptionError) as e:
        check_fields(ServeOptions("m", **change), flag=True)
    assert str(e.value) == message


def test_a_bad_eval_window_names_its_flag():
    with pytest.raises(OptionError) as e:
        check_fields(EvalOptions("m", seq_len=1), flag=True)
    assert str(e.value) == "--seq-len must be >= 2, got 1"


def test_checked_options_hold_the_checked_values():
    opts = check_fields(ServeOptions("m", drain=2, threads=None), flag=True)
    assert opts.drain == 2.0 and isinstance(opts.drain, float) and opts.threads is None


def test_dist_is_the_launcher_place_with_collectives(monkeypatch):
    for name, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    world = launched_world()
    assert isinstance(world, Place) and world == Dist(3, 8, 1, 4) and not world.is_main
    assert [f.name for f in dataclasses.fields(Dist)] == [f.name for f in dataclasses.fields(Place)]


def test_free_port_is_written_once():
    found = [
        p.relative_to(ROOT).as_posix()
        for folder in ("blt", "tests", "bench")
        for p in (ROOT / folder).rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name == "free_port"
    ]
    assert found == ["blt/net.py"]
