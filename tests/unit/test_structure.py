"""The package's structure, read from the source (ast; nothing is imported or run): no import
cycle, function-level imports included; the model stays single-device PyTorch; nothing outside
blt/train/ reaches into the trainer; the loading room sits below the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "blt"


def modules(pkg: Path = PKG) -> dict[str, Path]:
    out = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(pkg.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path) -> list[str]:
    """Every module `name` imports, at any depth of its code (functions, classes, if blocks)."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found += [base] + [f"{base}.{a.name}" for a in node.names]
    return found


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = modules(pkg)

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for t in imports(m, path):
            r = resolve(t) if t.split(".")[0] == "blt" else None
            if r and r != m and not m.startswith(r + "."):  # a module reaching its own package is no edge
                edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_function_level_imports():
    assert cycles(graph()) == []


def test_the_guard_sees_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "blt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from blt.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def late():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("import blt.a\n")
    assert cycles(graph(pkg)) == [["blt.a", "blt.sub.b"]]


def test_the_model_is_single_device_pytorch():
    banned = ("deepspeed", "wandb", "accelerate", "torch.distributed", "blt.train", "blt.monitor")
    found = [
        (m, t) for m, p in modules().items() if m.startswith("blt.model") for t in imports(m, p) if t.startswith(banned)
    ]
    assert found == []


def test_nothing_outside_the_trainer_imports_it():
    edges = graph()
    outside = [
        (m, t)
        for m, ts in edges.items()
        for t in ts
        if t.startswith("blt.train") and not m.startswith("blt.train") and m != "blt.cli"
    ]
    assert outside == []


def test_the_loading_room_sits_below_the_trainer_and_generation():
    edges = graph()
    above = ("blt.train", "blt.generation", "blt.cli", "blt.export", "blt.hf", "blt.monitor")
    found = [(m, t) for m, ts in edges.items() if m.startswith("blt.artifacts") for t in ts if t.startswith(above)]
    assert found == []


def test_deepspeed_is_imported_in_one_module():
    """blt/artifacts/zero.py imports it (lazily) and reads ZeRO checkpoints; the training engine
    blt/train/deepspeed_engine.py gets the module from there."""
    users = sorted({m for m, p in modules().items() for t in imports(m, p) if t.split(".")[0] == "deepspeed"})
    assert users == ["blt.artifacts.zero"]
