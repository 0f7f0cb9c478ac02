"""The package's structure (docs/ARCHITECTURE.md): lower layers never import higher ones, and no
module imports another at import time while that one is still being initialised (no import cycle).

Both are read from the code itself: the layer rule and the cycles over every import statement
(`ast`, imports inside functions included), and, in a fresh interpreter that imports every module,
by watching for a module that is read while still half-initialised.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hafloc"

# docs/ARCHITECTURE.md's order: a module may import its own layer and the layers before it.
LAYERS: list[tuple[str, ...]] = [
    ("hafloc._version", "hafloc.errors", "hafloc.fileio", "hafloc.hloc_h5", "hafloc.configs"),
    ("hafloc.images",),
    ("hafloc.datasets",),
    ("hafloc.synth",),  # writes the '@' layout (and meta.json) that datasets reads
    ("hafloc.backbones",),
    ("hafloc.heads",),
    ("hafloc.local",),
    ("hafloc.descriptors",),
    ("hafloc.index",),
    ("hafloc.metrics",),
    ("hafloc.reports",),
    ("hafloc.train",),
    ("hafloc.api",),  # the public names
    ("hafloc.cli", "hafloc.serve", "hafloc.demo"),
    ("hafloc", "hafloc.__main__"),  # the package root re-exports hafloc.api's names (on first use)
]
ROOT = "hafloc"  # names only the package's __init__: its modules each need a layer of their own

# (importer, imported) pairs allowed against the order, each with its reason. Keep it empty.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or (prefix != ROOT and name.startswith(prefix + "."))
            if inside and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{name} is in no layer of docs/ARCHITECTURE.md: add it there and here"
    return best


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> list[tuple[str, int, bool]]:
    """(imported hafloc module, line, at module level) for every import statement of ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def add(target: str, line: int, top: bool) -> None:
        if target == "hafloc" or target.startswith("hafloc."):
            while target not in MODULES and "." in target:  # an attribute of a module, not a module
                target = target.rpartition(".")[0]
            out.append((target, line, top))

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child.lineno, top)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for alias in child.names:
                    sub = f"{mod}.{alias.name}"
                    add(sub if sub in MODULES else mod, child.lineno, top)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False)  # never runs: not an import-time edge
            else:
                visit(child, top)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return out


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_lower_layers_never_import_higher_ones():
    bad = []
    for name in MODULES:
        for target, line, _ in imports_of(name):
            if layer_of(target) > layer_of(name) and (name, target) not in ALLOWED_UPWARD:
                bad.append(
                    f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} (layer {layer_of(name)}) "
                    f"imports {target} (layer {layer_of(target)})"
                )
    assert not bad, "imports against docs/ARCHITECTURE.md's layer order:\n" + "\n".join(bad)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle_even_through_imports_inside_functions():
    # Stricter than "at import time": a lazy import back (a function importing a module that
    # imports this one) is a cycle too; it only hides the knot until the function runs.
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        edges = graph.setdefault(name, set())
        for target, _, _top in imports_of(name):
            if target == name:
                continue
            edges.add(target)
            # importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer lives inside them
            parts = target.split(".")
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if not (name == pkg or name.startswith(pkg + ".")):
                    edges.add(pkg)
    cycles = _strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


_WATCH = r"""
import builtins, importlib.util, json, sys
real_import = builtins.__import__
seen = set()

def initialising(name):
    mod = sys.modules.get(name)
    spec = getattr(mod, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))

def watch(name, globals=None, locals=None, fromlist=(), level=0):
    mod = real_import(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__", "") or ""
    if importer.split(".")[0] == "hafloc":
        target = importlib.util.resolve_name("." * level + name, globals.get("__package__")) if level else name
        if target.split(".")[0] == "hafloc":
            names = [f"{target}.{f}" for f in (fromlist or ()) if f"{target}.{f}" in sys.modules] or [target]
            for t in names:
                inside = importer == t or importer.startswith(t + ".")  # a package importing its own parts
                if not inside and initialising(t):
                    seen.add((importer, t))
    return mod

builtins.__import__ = watch
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"
print(json.dumps({"cycles": sorted(seen), "failed": failed}))
"""


def test_every_module_imports_in_a_fresh_interpreter_without_cycles():
    names = sorted(n for n in MODULES if n != "hafloc.__main__")  # importing it runs the command line
    proc = subprocess.run(
        [sys.executable, "-c", _WATCH, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not res["failed"], res["failed"]
    assert not res["cycles"], "modules read while still initialising (import cycles): " + "; ".join(
        f"{a} -> {b}" for a, b in res["cycles"]
    )


# The command line presents the core; only ``hafloc serve`` starts the web layer.
CLI_MAY_IMPORT_SERVE = {"hafloc.cli.serve"}


def cli_imports_of_serve() -> list[str]:
    """'file:line: importer imports target' for each import of ``hafloc.serve`` by a ``hafloc.cli`` module
    other than ``CLI_MAY_IMPORT_SERVE`` (imports inside functions included)."""
    return [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} imports {target}"
        for name in MODULES
        if name.startswith("hafloc.cli.") and name not in CLI_MAY_IMPORT_SERVE
        for target, line, _ in imports_of(name)
        if target == "hafloc.serve" or target.startswith("hafloc.serve.")
    ]


def test_only_cli_serve_imports_the_web_layer():
    bad = cli_imports_of_serve()
    assert not bad, "the command line must run core jobs below the web layer:\n" + "\n".join(bad)


def test_a_cli_to_serve_import_inside_a_function_is_seen(tmp_path, monkeypatch):
    fake = tmp_path / "hafloc" / "cli" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def run():\n    from ..serve.app import create_app\n")
    monkeypatch.setitem(MODULES, "hafloc.cli.fake", fake)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "hafloc")
    assert cli_imports_of_serve() == ["hafloc/cli/fake.py:2: hafloc.cli.fake imports hafloc.serve.app"]


MAX_MODULE_LINES = 700  # a module past this holds several jobs: split it by job (as index/store.py was)


def test_every_module_is_under_the_size_limit():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    big = {name: n for name, n in sizes.items() if n >= MAX_MODULE_LINES}
    assert not big, f"modules of {MAX_MODULE_LINES}+ lines: {big}"
    assert max(sizes.values()) > 100  # the sizes are real line counts
