"""The package outside the checkout: configs by name (`blt train tiny`), the wheel's contents, and
the quick start trained by a wheel installed in a fresh venv in another directory.

The wheel is built as a user builds it, `python -m build` (an sdist, then the wheel from it), with
--no-isolation because there is no network to fetch the build backend into an isolated env. The
fresh venv cannot download torch either: pip installs the wheel alone into it (--no-deps
--no-index), then one .pth line lends it this environment's site-packages for the dependencies.
Python does not read the .pth files of a folder a .pth line adds, so this environment's editable
install of blt stays out; the test proves that the wheel's copy runs and nothing of the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from blt.config import ConfigError, config_file, config_to_dict, load_config, shipped_configs

from badinput import ROOT, run_blt
from conftest import CONFIGS, TINY_BLT, TINY_LM, read_metrics, run_cli

NAMES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


# ----------------------------------------------------------------------------- configs by name


def test_every_shipped_config_loads_by_name_as_by_path():
    assert list(shipped_configs()) == NAMES
    for name in NAMES:
        assert config_file(name) == CONFIGS / f"{name}.yaml"
        assert config_to_dict(load_config(name)) == config_to_dict(load_config(CONFIGS / f"{name}.yaml"))


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_text("name: mine\ntraining: {steps: 3}\n")
    cfg = load_config("tiny")
    assert (cfg.name, cfg.training.steps) == ("mine", 3)
    Path("tiny").unlink()
    Path("tiny").mkdir()  # a directory of that name is a path too, and not a config
    with pytest.raises(ConfigError, match="config file 'tiny' is a directory"):
        load_config("tiny")


def test_a_missing_path_is_not_looked_up_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in ("tiny.yaml", "configs/tiny.yaml", "./tiny"):
        with pytest.raises(ConfigError, match=f"config file '{Path(missing)}' not found") as e:
            load_config(missing)
        assert all(name in str(e.value) for name in NAMES)  # the hint names what ships


def test_an_unknown_name_is_one_line_listing_the_shipped_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for verb in ("train", "info", "plan"):
        code, out, err = run_cli(capsys, verb, "tnyi")
        assert (code, out) == (2, "")
        assert err.startswith(f"blt {verb}: error: config 'tnyi' is neither a file nor a shipped config (shipped: ")
        assert err.count("\n") == 1 and "Traceback" not in err
        assert all(name in err for name in NAMES)
        code, out, err = run_cli(capsys, verb, "a" * 300)  # a name too long for the file system
        assert (code, out) == (2, "") and err.count("\n") == 1, err
        assert err.startswith(f"blt {verb}: error: config file '{'a' * 300}' cannot be read: File name too long")
    assert list(tmp_path.iterdir()) == []


def test_info_and_plan_take_a_name(capsys):
    code, out, _ = run_cli(capsys, "info", "tiny", "model.global_model.layers=2")
    assert code == 0 and json.loads(out)["params"] > 0
    code, out, _ = run_cli(capsys, "plan", "blt_8b", "--nodes", "8", "--procs-per-node", "8")
    assert code == 0 and out.startswith("world size 64 = 8 node(s) x 8 process(es)")


# ----------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    return whl


def _files(folder: Path) -> set[str]:
    """Every file under `folder`, as its name inside the wheel (blt/...), bytecode caches left out."""
    return {p.relative_to(ROOT).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_the_wheel_holds_every_module_config_and_data_file_and_no_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert wheel.name.startswith("blt_bytes-")
    assert {n for n in names if n.endswith(".py")} == {n for n in _files(ROOT / "blt") if n.endswith(".py")}
    assert {f"blt/configs/{name}.yaml" for name in NAMES} <= names
    assert _files(ROOT / "blt" / "data" / "shakespeare") <= names
    assert _files(ROOT / "blt" / "harness" / "tasks") <= names
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench", "launch", "configs", "docs")]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "blt = blt.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_the_wheel_in_a_fresh_venv_elsewhere_trains_the_quick_start_by_name(wheel, tmp_path, cache_dir):
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py, blt = venv / "bin" / "python", venv / "bin" / "blt"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = sysconfig.get_path("purelib")  # torch & co. (with this environment's editable blt, not activated)
    Path(site, "dependencies.pth").write_text(deps + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"WANDB_MODE": "disabled"}

    def run(*args, cwd=work):
        return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    probe = run(
        py,
        "-c",
        "import json, sys, blt.cli, blt.config\n"
        "mods = [getattr(m, '__file__', None) or '' for m in list(sys.modules.values())]\n"
        "print(json.dumps({'blt': blt.__file__, 'tiny': str(blt.config.shipped_configs()['tiny']),\n"
        "                  'path': sys.path, 'modules': mods, 'finders': [repr(f) for f in sys.meta_path]}))",
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert Path(seen["blt"]).is_relative_to(site) and Path(seen["tiny"]) == Path(site, "blt", "configs", "tiny.yaml")
    assert not [p for p in seen["path"] + seen["modules"] if p.startswith(str(ROOT)) and not p.startswith(deps)]
    assert not [f for f in seen["finders"] if "Editable" in f]

    # the quick start, by name, in a directory with no configs/ and no checkout
    quick = [*TINY_BLT, "patching.entropy_cache=false"]  # entropies of 2 steps' batches, not of the whole corpus
    for name, shrink in (("entropy_tiny", TINY_LM), ("tiny", quick)):
        out = run(blt, "train", name, f"data.cache_dir={cache_dir}", "training.steps=2", *shrink)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.splitlines()[-1])["step"] == 2
        assert read_metrics(work / "runs" / name)[-1]["step"] == 2
        assert (work / "runs" / name / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]

    # ... and the path from the checkout records the same config
    checkout = tmp_path / "checkout_run"
    entropy = work / "runs" / "entropy_tiny"
    out = run_blt(
        "train",
        "configs/tiny.yaml",
        f"run_dir={checkout}",
        f"patching.entropy_model={entropy}",
        f"data.cache_dir={cache_dir}",
        "training.steps=2",
        *quick,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    by_name, by_path = (yaml.safe_load((d / "config.yaml").read_text()) for d in (work / "runs" / "tiny", checkout))
    assert by_name["patching"]["entropy_model"] == str(entropy)  # runs/entropy_tiny of the cwd, resolved
    assert by_name == by_path | {"run_dir": None}
