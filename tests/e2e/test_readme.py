"""Every command in the code blocks of README.md and then of every docs page, in mkdocs.yml's nav
order, runs as written, in a scratch directory holding the repo's configs/, launch/ and bundled
corpus (blt/data/shakespeare/), with `blt` and `python` on PATH: the docs cannot drift from the
code. Order matters: later pages use what earlier ones made (runs/tiny, from the quick start).
docs/index.md includes the README's front text only when the site is built (pymdownx.snippets), so
its file holds no commands and the quick start runs once, from README.md.

Shell blocks (bash, sh, console, unlabelled) are cut into commands: comments dropped, `\\` lines
joined, `&&` chains split. A `$ ` line is run and must print the lines shown under it; every other
command must exit 0. Python blocks run with this Python. A command that trains gets only
`shrunk`'s overrides appended (2 steps, conftest's tiny sizes, the session's data cache), none of
the keys it sets itself. What cannot run here is in NOT_HERE with the reason, and every entry must
still be a command on some page, so the table cannot go stale. The site itself is built with the
real `mkdocs build --strict`, which fails on a broken link or anchor.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_BLT, TINY_LM

README = ROOT / "README.md"
MKDOCS = ROOT / "mkdocs.yml"
INSTALL = "installs packages: CI installs the same way before it runs the tests"
NOT_HERE = {  # command, as a page writes it -> why it cannot run in a test
    "pip install torch==2.13.0": INSTALL,
    "pip install -e .": INSTALL,
    'pip install -e ".[test]"': INSTALL,
    'pip install -e ".[serve]"': INSTALL,
    "pytest": "the test suite itself",
    'pytest -m "not slow"': "the test suite itself, less its slow tests",
    "pytest tests/unit": "a tier of the test suite itself",
    "pytest tests/e2e": "a tier of the test suite itself",
    "pytest tests/dist": "a tier of the test suite itself",
    "python -m build --wheel --no-isolation": "builds a wheel: tests/e2e/test_package.py builds and installs one",
    "pip install dist/blt_bytes-0.1.0-py3-none-any.whl": INSTALL,
    "blt train entropy_tiny": "the wheel's quick start by name: tests/e2e/test_package.py runs it outside the checkout",
    "blt train tiny": "the wheel's quick start by name: tests/e2e/test_package.py runs it outside the checkout",
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh configs/blt_1b.yaml": "two nodes, the 1B GPU preset",
    "NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh configs/blt_1b.yaml": "two nodes, the 1B GPU preset",
    "HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/blt_8b.yaml": "ssh to a hostfile's hosts, 8B preset",
    "sbatch --nodes 8 launch/slurm.sbatch configs/blt_8b.yaml": "a SLURM cluster",
    "ACCEL_CONFIG=launch/accelerate/zero3.yaml launch/accelerate.sh configs/blt_1b.yaml": (
        "the 1B GPU preset (CUDA, bf16, and its entropy model runs/entropy_100m, which no command trains)"
    ),
}
NOT_COMMANDS = {  # first line of a shell block that is not commands -> what it is
    "blt train CONFIG [key=value ...]": "the command-line synopsis: words in capitals are placeholders",
}
STAND_INS = {  # a path a command names that no page's command makes -> the output standing in for it
    "path/to/blt-1b": "exports/tiny-hf",  # an HF BLT dir; facebook/blt-1b itself needs the network
}
SERVERS = ("blt dashboard runs/tiny", "blt serve runs/tiny --port 8000")  # must serve its URL; then
# stopped with Ctrl-C (exit 130); the Python blocks right after a server's command run while it serves
SHELL = ("bash", "sh", "console", "shell", "")
# shrunk's overrides are conftest's tiny sizes less its 64-byte windows and batch: `blt eval` scores
# the whole validation split, twice as fast in the configs' own 512-byte windows
KEEP = {"data.seq_len", "training.batch_size"}


def nav_pages() -> list[Path]:
    """The docs pages in mkdocs.yml's nav order (sections flattened)."""

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from walk(value) if isinstance(value, list) else [ROOT / "docs" / value]

    return list(walk(yaml.safe_load(MKDOCS.read_text())["nav"]))


def pages() -> list[Path]:
    """README.md, then every docs page in nav order: the order the commands run in."""
    return [README, *nav_pages()]


def page_steps() -> list[tuple[str, str, str, list[str] | None]]:
    """(page, kind, code, expected output) of every page, in run order."""
    return [(p.relative_to(ROOT).as_posix(), *s) for p in pages() for s in steps(p.read_text(encoding="utf-8"))]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m[1].strip().lower(), m[2]) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S)]


def _cut(line: str) -> list[str]:
    """One shell line -> its commands: the comment dropped, split at top-level `&&` (quotes respected)."""
    quote, i, start, out = None, 0, 0, []
    while i < len(line):
        ch = line[i]
        if ch == "\\" and quote != "'":
            i += 2
            continue
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        elif line.startswith("&&", i):
            out.append(line[start:i])
            start = i = i + 2
            continue
        i += 1
    return [c.strip() for c in [*out, line[start:i]] if c.strip()]


def steps(text: str) -> list[tuple[str, str, list[str] | None]]:
    """A page's blocks in order: (kind, code, expected output lines) with kind run, console, python or skip."""
    out = []
    for lang, body in blocks(text):
        if lang == "python":
            out.append(("python", body, None))
            continue
        if lang not in SHELL:
            continue
        lines = re.sub(r"\\\n\s*", " ", body).splitlines()
        if lines and lines[0].split("#")[0].strip() in NOT_COMMANDS:
            out.append(("skip", lines[0].split("#")[0].strip(), None))
            continue
        if any(ln.startswith("$ ") for ln in lines):  # a console session: commands and their output
            for ln in lines:
                if ln.startswith("$ "):
                    out.append(("console", ln[2:].strip(), []))
                elif ln.strip() and out and out[-1][0] == "console":
                    out[-1][2].append(ln)
            continue
        for ln in lines:
            out.extend(("skip" if c in NOT_HERE else "run", c, None) for c in _cut(ln))
    return out


def shrunk(command: str, scratch: Path, cache_dir: Path) -> str:
    """`command` with the small overrides appended when it trains (blt train, or a launcher that is
    not a dry run), leaving the keys it sets itself alone."""
    words = shlex.split(command)
    env = {}
    while words and re.match(r"[A-Za-z_]\w*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:2] == ["blt", "train"]:
        config = words[2]
    elif words and words[0].startswith("launch/") and env.get("DRY_RUN") != "1":
        config = words[1]
    else:
        return command
    arch = ((yaml.safe_load((scratch / config).read_text()) or {}).get("model") or {}).get("arch", "blt")
    own = {w.split("=", 1)[0] for w in words if "=" in w and not w.startswith("-")}
    extra = [*(TINY_LM if arch == "byte_lm" else TINY_BLT), "training.steps=2", f"data.cache_dir={cache_dir}"]
    return " ".join([command, *(shlex.quote(o) for o in extra if o.split("=", 1)[0] not in own | KEEP)])


def scratch_dir(tmp: Path) -> tuple[Path, dict]:
    """A directory with configs/, launch/ and blt/data/shakespeare/ (the bundled corpus, as in a
    checkout), and the environment the commands run in."""
    for name in ("configs", "launch", "blt/data/shakespeare"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).symlink_to(ROOT / name)
    bin_dir = tmp / ".bin"
    bin_dir.mkdir()
    for name, run in (("blt", "-m blt "), ("python", ""), ("python3", "")):  # this Python, its venv included
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {run}"$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # W&B auto: offline, no key
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    return tmp, env


def serve_and_stop(command: str, cwd: Path, env: dict, clients: list[str] = (), page: str = "README.md") -> None:
    """Run a server command: it must print a URL that answers; the Python `clients` run against it;
    then Ctrl-C stops it (exit 130)."""
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()  # the server prints its URL once it listens
        url = re.search(r"http://\S+", line)
        assert url, f"`{command}` printed {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        for _ in range(30):
            try:
                with urllib.request.urlopen(url[0], timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError(f"`{command}`: nothing answers at {url[0]}")
        for code in clients:
            run_python(code, cwd, env, page)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 130, f"`{command}` after Ctrl-C: rc {rc}, stderr:\n{proc.stderr.read()}"


def test_readme_tables_are_current():
    """NOT_HERE, NOT_COMMANDS and STAND_INS name commands of the README and docs pages; every block is parsed."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages())
    found = page_steps()
    skipped = {code for _, kind, code, _ in found if kind == "skip"}
    for entry in [*NOT_HERE, *NOT_COMMANDS]:
        assert entry in text and entry in skipped, f"stale table entry (not a command on any page any more): {entry}"
    runs = [code for _, kind, code, _ in found if kind == "run"]
    for stand_in in STAND_INS:
        assert any(stand_in in c for c in runs), f"stale stand-in: {stand_in}"
    for server in SERVERS:
        assert server in runs, f"stale server entry: {server}"
    assert any(kind == "python" for _, kind, _, _ in found) and any(kind == "console" for _, kind, _, _ in found)
    assert len(runs) >= 25  # the block parser still sees the pages' commands (30 today)


def test_readme_hf_export_path_holds_at_full_size():
    """What the docs export with --format hf, they trained with a config HF can hold at full size
    (the run test below shrinks the models, which can hide a shape HF's layout has no place for)."""
    import torch

    from blt.config import load_config
    from blt.hf import PROJ, check_hf_expressible

    runs = [code for _, kind, code, _ in page_steps() if kind == "run"]
    exported = [shlex.split(c)[2] for c in runs if c.startswith("blt export ") and "--format hf" in c]
    assert exported
    for run in exported:
        trained = []
        for c in runs:
            words = shlex.split(c)
            if words[:2] == ["blt", "train"]:
                cfg = load_config(ROOT / words[2], words[3:])
                if cfg.resolved_run_dir == Path(run):
                    trained.append(cfg)
        assert trained, f"no page's command trains {run}, which the docs export"
        for cfg in trained:  # a trained projection is never the identity HF puts in its place
            check_hf_expressible(cfg, {PROJ: torch.zeros(0)})


def run_python(code: str, cwd: Path, env: dict, page: str = "README.md") -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{page} python block failed:\n{code}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path, cache_dir):
    scratch, env = scratch_dir(tmp_path)
    todo = page_steps()
    for i, (page, kind, code, shown) in enumerate(todo):
        if kind == "skip" or (kind == "python" and i and todo[i - 1][2] in SERVERS):
            continue  # a server's clients run in serve_and_stop
        if kind == "python":
            run_python(code, scratch, env, page)
            continue
        for stand_in, real in STAND_INS.items():
            if stand_in in code and not (scratch / stand_in).exists():
                (scratch / stand_in).parent.mkdir(parents=True, exist_ok=True)
                (scratch / stand_in).symlink_to(scratch / real)
        if code in SERVERS:
            clients = [c for _, k, c, _ in todo[i + 1 : i + 2] if k == "python"]
            serve_and_stop(code, scratch, env, clients, page)
            continue
        command = code if kind == "console" else shrunk(code, scratch, cache_dir)
        proc = subprocess.run(
            ["bash", "-c", command], cwd=scratch, env=env, capture_output=True, text=True, timeout=600
        )
        said = f"{page}: `{command}` -> rc {proc.returncode}\n"
        said += f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
        if kind == "console":  # the page shows what it prints: an error line means exit 2
            assert (proc.stdout + proc.stderr).splitlines() == shown, said
            assert proc.returncode == (2 if re.match(r"blt [\w-]+: error: ", shown[0]) else 0), said
        else:
            assert proc.returncode == 0, said


def mkdocs_build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    """The real `mkdocs build --strict` of config_dir's mkdocs.yml, run there (snippets read README.md from it)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=config_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    proc = mkdocs_build(ROOT, site)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return site


def built(site: Path, page: Path) -> Path:
    """Where mkdocs writes a docs page (directory URLs: docs/data.md -> site/data/index.html)."""
    rel = page.relative_to(ROOT / "docs").with_suffix("")
    return site / ("index.html" if rel.name == "index" else rel / "index.html")


def test_docs_site_builds_strict(site):
    """`mkdocs build --strict` passes on the repo's mkdocs.yml and builds every nav page; the home
    page carries the README's quick start."""
    for page in nav_pages():
        assert page.is_file(), f"mkdocs.yml's nav names {page}, which does not exist"
        assert built(site, page).is_file(), f"{page.name} was not built"
    assert nav_pages()[0].name == "index.md"
    home = built(site, ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert 'id="quick-start"' in home and "configs/entropy_tiny.yaml" in home


def test_readme_links_reach_the_docs(site):
    """Every relative link in README.md names a file of the repo, and a docs page's anchor exists in
    the built site (the README is not part of the site, so mkdocs does not check it)."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    relative = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(relative) >= 10
    for link in relative:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), link
            html = built(site, ROOT / path).read_text(encoding="utf-8")
            assert f'id="{anchor}"' in html, f"README.md links to {link}: no such anchor in the built page"


@pytest.mark.parametrize(
    "link, broken",
    [("](data.md#blt-prepare)", "](no-such-page.md)"), ("](data.md#blt-prepare)", "](data.md#no-such-anchor)")],
)
def test_docs_build_fails_on_a_broken_link(tmp_path, link, broken):
    """The strict build bites: a copy of the docs with one link broken (a missing page, a missing
    anchor) fails to build, naming the link."""
    for name in ("docs", "mkdocs.yml", "README.md"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    page = tmp_path / "docs" / "patching.md"
    text = page.read_text(encoding="utf-8")
    assert link in text
    page.write_text(text.replace(link, broken), encoding="utf-8")
    proc = mkdocs_build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0, f"a broken link built:\n{proc.stderr[-2000:]}"
    assert broken[2:-1] in proc.stderr, proc.stderr[-2000:]
