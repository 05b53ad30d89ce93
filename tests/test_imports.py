"""The house has no back doors: the import graph of ``src/influencelab`` has no circle, neither between modules nor
between a package (``stages/``, ``solvers/``, ``data/``) and the modules outside it.

The graph is built from the modules' source with :mod:`ast`, not by importing them: every ``import`` and
``from ... import`` statement counts, at module level and inside functions alike (a function-level import hides a
circle from Python's import machinery, not from the design), relative imports resolved against the importing
module's package; ``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one, else to
``pkg`` (its ``__init__``). Imports under ``if TYPE_CHECKING:`` count too (a type-only circle is still two modules
that each need the other), and so does a package ``__init__`` that imports its own submodules by name at run time
(``pkgutil.iter_modules(__path__)`` + ``importlib.import_module``, as ``stages.load_all`` does): an edge to each of
its submodules. The implicit import of a module's parent package (Python runs ``pkg/__init__.py`` before
``pkg.mod``) is not an edge, so that ``influencelab/__init__.py`` re-exporting the API is allowed.

At the package level every module under ``stages/``, ``solvers/`` and ``data/`` is one node (its package's);
the modules outside these packages stay single nodes.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "influencelab"
#: the packages collapsed into one node each for the package-level graph
PACKAGES = ("stages", "solvers", "data")


def module_names(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package, ``influencelab.x.y`` -> its file (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _loads_submodules(tree: ast.AST) -> bool:
    """Whether a package ``__init__`` imports its submodules dynamically (``pkgutil.iter_modules(__path__)``)."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "iter_modules"
               and any(isinstance(a, ast.Name) and a.id == "__path__" for a in n.args) for n in ast.walk(tree))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that module ``name`` (at ``path``) imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    if path.name == "__init__.py" and _loads_submodules(tree):
        targets.update(m for m in modules if m.rpartition(".")[0] == name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                targets.add(sub if sub in modules else mod)
    out = set()
    for t in targets:
        while t and t not in modules:  # `import influencelab.x.y` of a non-module name: its nearest module
            t = t.rpartition(".")[0]
        if t and t != name:
            out.add(t)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """``module -> the modules of the package it imports``."""
    modules = module_names(src)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def package_of(module: str) -> str:
    """The node of ``module`` in the package-level graph: ``influencelab.stages`` for every stage module, etc."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in PACKAGES:
        return ".".join(parts[:2])
    return module


def collapse(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The package-level graph: each of :data:`PACKAGES` one node, edges within a node dropped."""
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        node = out.setdefault(package_of(m), set())
        node.update(package_of(t) for t in targets if package_of(t) != package_of(m))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of ``graph`` as ``[a, b, ..., a]`` (``None`` when it has none): depth-first search, the first back
    edge found."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)) is not None:
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


def _show(cycle: list[str]) -> str:
    return " -> ".join(c.removeprefix(f"{ROOT}.") for c in cycle)


def test_graph_sees_relative_function_level_type_checking_and_dynamic_imports(tmp_path):
    """The builder itself, on a small package: relative imports at module and function level, ``from . import
    mod``, ``from ..pkg import name`` (a package's ``__init__``), TYPE_CHECKING imports, a package ``__init__``
    loading its submodules by name; a circle found and named, at the module and at the package level."""
    pkg = tmp_path / ROOT
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("from . import b\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .stages import load_all\n")
    (pkg / "stages" / "__init__.py").write_text(
        "import importlib, pkgutil\ndef load_all():\n    for i in pkgutil.iter_modules(__path__):\n"
        "        importlib.import_module(f'{__name__}.{i.name}')\n")
    (pkg / "stages" / "one.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from ..a import A\n")
    (pkg / "stages" / "two.py").write_text("x = 2\n")
    g = import_graph(tmp_path)
    assert g == {ROOT: {f"{ROOT}.a"}, f"{ROOT}.a": {f"{ROOT}.b"}, f"{ROOT}.b": {f"{ROOT}.stages"},
                 f"{ROOT}.stages": {f"{ROOT}.stages.one", f"{ROOT}.stages.two"},
                 f"{ROOT}.stages.one": {f"{ROOT}.a"}, f"{ROOT}.stages.two": set()}
    assert _show(find_cycle(g)) == "a -> b -> stages -> stages.one -> a"
    assert _show(find_cycle(collapse(g))) == "a -> b -> stages -> a"
    (pkg / "stages" / "one.py").write_text("from .two import x\n")  # within the package: no circle
    assert find_cycle(g := import_graph(tmp_path)) is None and find_cycle(collapse(g)) is None
    (pkg / "stages" / "two.py").write_text("def f():\n    from ..b import f\n")  # stages -> b -> stages
    g = import_graph(tmp_path)
    assert find_cycle(g) is not None and _show(find_cycle(collapse(g))) == "b -> stages -> b"


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert len(graph) > 30 and f"{ROOT}.pipeline" in graph[f"{ROOT}.cli"]  # (a function-level import)
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle between modules: {_show(cycle)}"


def test_no_import_cycle_between_packages_and_modules():
    """``stages/``, ``solvers/`` and ``data/`` each one node: no package imports a module that imports it back
    (e.g. stages -> report -> stages, or solvers -> compose -> solvers)."""
    cycle = find_cycle(collapse(import_graph()))
    assert cycle is None, f"import circle at the package level: {_show(cycle)}"


def test_what_everything_reads_imports_nothing_of_the_package():
    """The stage registry sits above the stages and the metric-name codec below every writer and reader: both
    are leaves, so any module may import them."""
    graph = import_graph()
    for leaf in ("registry", "metric_names", "errors"):
        assert graph[f"{ROOT}.{leaf}"] == set(), (leaf, graph[f"{ROOT}.{leaf}"])
