"""Every ``from <project module> import name`` in the tree names something that exists, including
the imports inside functions that only run on a GPU machine (a renamed helper otherwise surfaces
there as a failed device call: 2026-12-07, ``scripts/attn_fa_check.py``)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gpt2_model", "tuning", "bench")


def _project_imports():
    for path in sorted(p for d in ("gpt2_model", "tuning", "bench", "scripts", "tests") for p in (ROOT / d).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module and not node.level:
                continue
            if node.level:  # relative: resolve against the file's package
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if module.split(".")[0] in PACKAGES:
                yield path.relative_to(ROOT), node.lineno, module, [a.name for a in node.names]


def test_every_project_import_names_something_that_exists():
    missing = []
    seen = 0
    for path, line, module, names in _project_imports():
        mod = importlib.import_module(module)
        for name in names:
            seen += 1
            if name != "*" and not hasattr(mod, name):
                try:  # a submodule imported by name
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"{path}:{line}: from {module} import {name}")
    assert seen > 500, seen  # (the walk found the tree's imports)
    assert not missing, "\n".join(missing)
