"""Helpers for tests that run the project's console scripts' ``--help`` in a fresh interpreter.

The entry points are read from pyproject.toml's ``[project.scripts]``, so the tests follow a CLI
module when it moves (no stale console-script wrapper, no reinstall needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """{script name: "module:function"} from pyproject.toml's [project.scripts]."""
    try:
        import tomllib  # pylint: disable=import-outside-toplevel
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # pylint: disable=import-outside-toplevel
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    scripts = data["project"]["scripts"]
    assert set(scripts) == {"gpt2k", "tune", "bench"}, f"pyproject [project.scripts]: {sorted(scripts)}"
    return dict(scripts)


# Runs in a fresh interpreter: import the entry point, call it once per argv (stdout captured,
# SystemExit caught), and report the exit codes, outputs, seconds and which heavy packages got
# imported. One interpreter serves many --help calls, so a slow import is paid once.
_RUNNER = textwrap.dedent("""
    import contextlib, importlib, io, json, sys, time
    spec = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    results = []
    for prog, entry, argv in spec:
        module, _, func = entry.partition(":")
        fn = getattr(importlib.import_module(module), func) if func else None
        out = io.StringIO()
        sys.argv = [prog] + argv
        with contextlib.redirect_stdout(out):
            try:
                code = fn() if fn is not None else 0
            except SystemExit as exc:
                code = exc.code
        results.append({"argv": [prog] + argv, "code": code, "stdout": out.getvalue()})
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tvm", "torch", "transformers"})
    print("@@RESULT@@" + json.dumps({"results": results, "seconds": time.perf_counter() - t0, "heavy": heavy}))
""")


def run_in_fresh_interpreter(calls: list[tuple[str, str, list[str]]], *, timeout: float = 600) -> dict:
    """Run ``(prog, "module:function", argv)`` calls in one new Python process.

    ``"module:"`` (no function) only imports the module. Returns ``{"results": [{"argv", "code",
    "stdout"}], "seconds": float, "heavy": [imported among tvm/torch/transformers]}``.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(calls)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    marker = proc.stdout.rfind("@@RESULT@@")
    assert proc.returncode == 0 and marker >= 0, (
        f"runner failed (exit {proc.returncode}) for {calls}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[marker + len("@@RESULT@@"):])
