"""The package's structure, read from the source (ast; nothing is imported or run): no import
cycle, function-level imports included; the model stays single-device PyTorch; nothing outside
blt/train/ reaches into the trainer; the loading room sits below the trainer; only blt/patching/
and blt/model/ ask which patching mode is active; generation, serving and the harness compute no
model math of their own."""

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


# Which patching mode is active is a question for blt/patching/ (the modes) and blt/model/ (the router)
# only: everywhere else asks the Patcher or the Mode (forward, training_terms, signal, needs_entropies).
MODE_ROOMS = ("blt.patching", "blt.model")
MODE_NAME_VALUES = {  # a mode's name written as a value of a format or a config, not branched on
    "blt.config": {"static"},  # the default of patching.mode
    "blt.hf": {"entropy", "static"},  # HF's patching_mode field, read and written
    "blt.train.prepare_job": {"entropy"},  # `blt prepare --entropy-model` sets an entropy model's mode
    "blt.artifacts.load": {"static"},  # a byte LM's patcher, which cuts nothing the model reads
}


def patching_modes(pkg: Path = PKG) -> dict[str, set[str]]:
    """What names a mode: {"names": its config names, "classes": its Mode subclasses, "modules": theirs}."""
    found: dict[str, set[str]] = {"names": set(), "classes": set(), "modules": set()}
    for f in sorted((pkg / "patching").glob("*.py")):
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "Mode" for b in node.bases):
                found["classes"].add(node.name)
                found["modules"].add(f"blt.patching.{f.stem}")
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "name":
                        found["names"].add(stmt.value.value)
    return found


def mode_questions(source: str, modes: dict[str, set[str]], allowed_names: frozenset = frozenset()) -> list[str]:
    """Where `source` asks which patching mode is active: `.learned`/`.needs_router`, a mode's name as a
    string (as in `cfg.mode == "learned"`), a Mode subclass or a mode's own module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if isinstance(node, ast.Attribute) and node.attr in ("learned", "needs_router"):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif name in modes["classes"]:
            found.append(f"line {node.lineno}: {name}")
        elif isinstance(node, ast.Constant) and node.value in modes["names"] - allowed_names:
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and (
            node.module in modes["modules"] or any(a.name in modes["classes"] for a in node.names)
        ):
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import) and any(a.name in modes["modules"] for a in node.names):
            found.append(f"line {node.lineno}: import {', '.join(a.name for a in node.names)}")
    return found


def test_the_guard_sees_a_module_asking_which_patching_mode_is_active():
    modes = patching_modes()
    assert modes["names"] == {"static", "space", "entropy", "learned"}
    asks = [
        "if patcher.learned:\n    pass",
        "x = mode_of(cfg).needs_router",
        "if cfg.patching.mode == 'learned':\n    pass",
        "from blt.patching.learned import BOUNDARY",
        "from blt.patching import Learned",
        "ok = isinstance(mode, patching.Entropy)",
    ]
    assert all(mode_questions(src, modes) for src in asks)
    assert mode_questions("x = mode_of(cfg).needs_entropies\nlogits, ids, r = patcher.forward(m, t)", modes) == []


def test_no_module_outside_patching_and_the_model_asks_which_patching_mode_is_active():
    modes = patching_modes()
    found = {}
    for m, path in modules().items():
        if any(m == room or m.startswith(room + ".") for room in MODE_ROOMS):
            continue
        asks = mode_questions(path.read_text(encoding="utf-8"), modes, frozenset(MODE_NAME_VALUES.get(m, ())))
        if asks:
            found[m] = asks
    assert found == {}


# The model's math is defined once, in blt/model/ (each module's `forward` and `step` side by side):
# generation, serving and the harness drive it and compute none of it themselves.
DRIVERS = ("blt.generation", "blt.serve", "blt.harness")
MODEL_MATH = {
    "scaled_dot_product_attention": "attention",
    "apply_rope": "RoPE",
    "rope_tables": "RoPE",
    "linear": "a projection (F.linear)",
    "silu": "the MLP",
    "weight": "a module's weights (stacking projections)",
    "ngram_hash": "n-gram hashing",
    "hash_windows": "n-gram hashing",
    "hash_powers": "n-gram hashing",
    "PRIMES": "n-gram hashing",
}


def model_math(source: str) -> list[str]:
    """Where `source` computes the model's math: attention, RoPE, projections, the MLP, weights, hashes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if isinstance(node, ast.alias):
            name = node.name
        if name in MODEL_MATH:
            found.append(f"line {getattr(node, 'lineno', '?')}: {name} ({MODEL_MATH[name]})")
    return found


def test_the_guard_sees_model_math_outside_the_model():
    math = [
        "y = F.scaled_dot_product_attention(q, k, v)",
        "from blt.model.layers import apply_rope",
        "w = torch.cat([a.q_proj.weight, a.k_proj.weight])",
        "h = sum(t * PRIMES[0] ** i for i, t in enumerate(g))",
        "qkv = F.linear(x, w)",
    ]
    assert all(model_math(src) for src in math)
    assert model_math("h = enc.step(tokens, context, cache)\nlogits = dec.logits(x)") == []


def test_generation_serving_and_the_harness_compute_no_model_math():
    found = {}
    for m, path in modules().items():
        if any(m == room or m.startswith(room + ".") for room in DRIVERS):
            math = model_math(path.read_text(encoding="utf-8"))
            if math:
                found[m] = math
    assert found == {}
