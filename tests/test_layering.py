"""The plan of the house: layers point one way and no project module takes part in an import cycle.

Layers: ``gpt2_model`` (model, loader, runtime that runs a built library) <- ``tuning`` <- ``bench``.
A module may import its own layer or a lower one, never a higher one; this counts every import
(module level, inside functions, under ``if TYPE_CHECKING``). Cycles are looked for in the graph
of imports that run when a module is imported (module level, ``TYPE_CHECKING`` blocks excluded):
a cycle there means the import order decides whether a name exists yet. Relative imports are
resolved; ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module.
The AST is walked by hand (no third-party tool).

Also here: ``--help`` of the three console scripts imports neither TVM nor PyTorch, which is
what keeps them fast (issue 10 item 2). No timing assertion: the seconds are printed only.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from .clihelp import ROOT, console_scripts, run_in_fresh_interpreter

PACKAGES = ("gpt2_model", "tuning", "bench")
LAYER = {"gpt2_model": 0, "tuning": 1, "bench": 2}


@dataclass(frozen=True)
class Import:
    source: str      # importing module, e.g. "tuning.compile"
    target: str      # imported project module, e.g. "tuning.apply"
    line: int
    kind: str        # "module" (runs when the module is imported), "function" or "typing" (TYPE_CHECKING)

    @property
    def runs_at_import(self) -> bool:
        return self.kind == "module"

    def where(self, files: dict[str, Path], root: Path) -> str:
        return f"{files[self.source].relative_to(root)}:{self.line}"


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under the packages (``pkg/__init__.py`` -> ``pkg``)."""
    mods = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest project module that `name` (a dotted path) names or lies inside, else None."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_imports(module: str, mods: dict[str, Path]) -> list[Import]:
    """Every import of a project module by `module`, with its line and whether it runs at import time."""
    path = mods[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if node.level:
            base = package.split(".")
            if node.level - 1 >= len(base):
                raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # `from pkg import name`: the submodule pkg.name when it is one, else pkg itself.
        return [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in mods else prefix for alias in node.names]

    def visit(node, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            child_kind = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == "module":
                child_kind = "function"
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in targets(child):
                    target = _resolve(name, mods)
                    imp = Import(module, target, child.lineno, kind)
                    if target is not None and target != module and imp not in found:
                        found.append(imp)
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), child_kind)
                continue
            visit(child, child_kind)

    visit(tree, "module")
    return found


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, Path], list[Import]]:
    mods = project_modules(root, packages)
    return mods, [imp for m in mods for imp in module_imports(m, mods)]


def back_arrows(imports: list[Import]) -> list[Import]:
    """Imports from a lower layer into a higher one."""
    return [i for i in imports
            if LAYER[i.target.split(".")[0]] > LAYER[i.source.split(".")[0]]]


def import_cycles(imports: list[Import], kinds=("module",)) -> list[list[Import]]:
    """One concrete cycle (a list of imports, each edge's target the next one's source) per
    strongly connected component with more than one module of the graph of `kinds` imports."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.kind in kinds:
            edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
            edges.setdefault(imp.target, {})
    # Tarjan's strongly connected components (iterative).
    index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1
                    stack.append(w); on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop(); on_stack.discard(w); comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    sccs.append(comp)
    cycles = []
    for comp in sccs:
        # Shortest cycle through the component's first module (BFS inside the component).
        start = min(comp)
        parent: dict[str, Import] = {}
        frontier, seen, closing = [start], {start}, None
        while frontier and closing is None:
            nxt = []
            for v in frontier:
                for w, imp in sorted(edges[v].items()):
                    if w == start:
                        closing = imp
                        break
                    if w in comp and w not in seen:
                        seen.add(w); parent[w] = imp; nxt.append(w)
                if closing is not None:
                    break
            frontier = nxt
        path = [closing]
        while path[0].source != start:
            path.insert(0, parent[path[0].source])
        cycles.append(path)
    return cycles


def _format_cycle(cycle: list[Import], mods, root) -> str:
    return " -> ".join([cycle[0].source] + [f"{i.target} ({i.where(mods, root)})" for i in cycle])


# --- the checker itself, on a made-up project with known faults -------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def test_checker_finds_back_arrows_and_cycles(tmp_path):
    _write(tmp_path, {
        "gpt2_model/__init__.py": "",
        "gpt2_model/config.py": "import os\n",
        "gpt2_model/runtime.py": ("from . import config\n"
                                  "def build():\n    from tuning.compile import build_it\n"),  # function-level back-arrow
        "gpt2_model/sub/__init__.py": "",
        "gpt2_model/sub/deep.py": "from .. import config\nfrom ..runtime import build\nimport bench.report as r\n",
        "tuning/__init__.py": "",
        "tuning/a.py": "from .b import x\n",
        "tuning/b.py": "import tuning.c\nfrom gpt2_model import config\n",
        "tuning/c.py": "from tuning import a\n",        # cycle a -> b -> c -> a
        "tuning/d.py": "def f():\n    from . import e\n",  # function-level: not a cycle
        "tuning/e.py": "from . import d\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bench import report\n",
        "bench/__init__.py": "",
        "bench/report.py": "from tuning.a import x\nfrom gpt2_model.config import y\n",
    })
    mods, imports = import_graph(tmp_path)
    assert set(mods) >= {"gpt2_model", "gpt2_model.sub.deep", "tuning.a", "bench.report"}
    edges = {(i.source, i.target, i.kind) for i in imports}
    # Relative imports resolve (`from .. import config` in gpt2_model.sub.deep is gpt2_model.config).
    assert {("gpt2_model.sub.deep", "gpt2_model.config", "module"),
            ("gpt2_model.sub.deep", "gpt2_model.runtime", "module"),
            ("tuning.a", "tuning.b", "module"), ("tuning.c", "tuning.a", "module"),
            ("tuning.d", "tuning.e", "function")} <= edges
    # tuning.compile does not exist in the made-up tree: the import counts as one of package `tuning`.
    assert {(i.source, i.target, i.kind) for i in back_arrows(imports)} == {
        ("gpt2_model.runtime", "tuning", "function"),
        ("gpt2_model.sub.deep", "bench.report", "module"),
        ("tuning.e", "bench.report", "typing"),
    }
    cycles = import_cycles(imports)
    assert len(cycles) == 1, cycles
    assert [i.source for i in cycles[0]] == ["tuning.a", "tuning.b", "tuning.c"]
    assert cycles[0][-1].target == "tuning.a"
    assert "tuning/c.py:1" in _format_cycle(cycles[0], mods, tmp_path)
    # Counting imports inside functions too, d -> e -> d is a cycle of the design.
    design = import_cycles(imports, kinds=("module", "function"))
    assert sorted([i.source for i in c] for c in design) == [["tuning.a", "tuning.b", "tuning.c"], ["tuning.d", "tuning.e"]]


# --- the project -------------------------------------------------------------------------------

class Graph:
    """The project's modules and imports (a class so pytest does not print 400 imports on failure)."""

    def __init__(self, root: Path):
        self.mods, self.imports = import_graph(root)

    def __repr__(self) -> str:
        return f"Graph({len(self.mods)} modules, {len(self.imports)} imports)"

    def report(self, imports: list[Import]) -> str:
        return "\n".join(f"  {i.source} -> {i.target}  ({i.where(self.mods, ROOT)}"
                         f"{'' if i.kind == 'module' else ', ' + i.kind + '-level'})" for i in imports)

    def report_cycles(self, cycles: list[list[Import]]) -> str:
        return "\n".join("  " + _format_cycle(c, self.mods, ROOT) for c in cycles)


@pytest.fixture(scope="module")
def graph():
    g = Graph(ROOT)
    # The walk sees the project: each layer has modules, and the upper layers use the lower ones.
    assert {m.split(".")[0] for m in g.mods} == set(PACKAGES)
    arrows = {(i.source.split(".")[0], i.target.split(".")[0]) for i in g.imports}
    assert {("tuning", "gpt2_model"), ("bench", "tuning"), ("bench", "gpt2_model")} <= arrows
    return g


def test_gpt2_model_imports_neither_tuning_nor_bench(graph):
    bad = [i for i in back_arrows(graph.imports) if i.source.startswith("gpt2_model")]
    assert not bad, "gpt2_model must not import tuning or bench:\n" + graph.report(bad)


def test_tuning_does_not_import_bench(graph):
    bad = [i for i in back_arrows(graph.imports) if i.source.startswith("tuning")]
    assert not bad, "tuning must not import bench:\n" + graph.report(bad)


def test_no_import_cycle_at_import_time(graph):
    cycles = import_cycles(graph.imports)
    assert not cycles, "import cycles between project modules (module-level imports):\n" + graph.report_cycles(cycles)


def test_no_import_cycle_hidden_in_functions(graph):
    """Issue 10: a cycle closed by a function-local import (today tune -> database -> tune,
    compile -> apply -> compile) is still a cycle of the design, only hidden from the interpreter."""
    cycles = import_cycles(graph.imports, kinds=("module", "function"))
    assert not cycles, ("import cycles between project modules, counting imports inside functions:\n"
                        + graph.report_cycles(cycles))


# --- --help stays light ------------------------------------------------------------------------

HELP_CALLS = {
    "gpt2_model.cli_common": [("cli_common", "gpt2_model.cli_common:", [])],
    **{name: [(name, entry, ["--help"])] for name, entry in console_scripts().items()},
}


@pytest.mark.parametrize("what", sorted(HELP_CALLS))
def test_help_does_not_import_tvm_or_torch(what):
    out = run_in_fresh_interpreter(HELP_CALLS[what])
    result = out["results"][0]
    print(f"{what}: import{' + --help' if what in console_scripts() else ''} took {out['seconds']:.2f} s "
          f"(heavy packages imported: {out['heavy'] or 'none'})")
    if what in console_scripts():
        assert result["code"] in (0, None), result
        assert "usage:" in result["stdout"], result["stdout"][:500]
    assert not out["heavy"], (f"{what}: importing it and printing --help imported {out['heavy']}; "
                              "import TVM / PyTorch lazily where the work is done")
