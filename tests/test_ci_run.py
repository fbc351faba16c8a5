""".ci/run on a made-up checkout: README's numbered commands run in order, then the slow tests
(pytest's exit 5, "no tests collected", is not a failure), and a checkout the commands leave
dirty fails CI. The made-up README's commands and a stub `python` stand in for the real ones,
so this runs in a second; the real commands are exercised by tests/test_readme_commands.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$STUB_LOG"
exit "${STUB_RC:-0}"
"""


def _checkout(tmp_path: Path, command_2: str = ". .venv/bin/activate && echo two >> log.txt") -> Path:
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "python").write_text(STUB_PYTHON)
    (stub / "python").chmod(0o755)
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy2(ROOT / ".ci" / "run", repo / ".ci" / "run")
    shutil.copy2(ROOT / "scripts" / "readme_commands.py", repo / "scripts" / "readme_commands.py")
    (repo / ".gitignore").write_text(".venv/\nlog.txt\n")
    (repo / "README.md").write_text(
        "# made up\n\n```bash\n"
        f"# 1. set up\necho one >> log.txt && mkdir -p .venv/bin && echo 'PATH=\"{stub}:$PATH\"' > .venv/bin/activate\n"
        f"# 2. the tests\n{command_2}\n```\n")
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "made up"]):
        subprocess.run(git + args, cwd=repo, check=True, capture_output=True)
    return repo


def _ci(repo: Path, stub_rc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, STUB_RC=str(stub_rc), STUB_LOG=str(repo.parent / "stub.log"))
    return subprocess.run(["bash", str(repo / ".ci" / "run")], cwd=repo.parent, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("stub_rc,expected", [(0, 0), (5, 0), (1, 1), (2, 2)])
def test_commands_in_order_then_slow_tests(tmp_path, stub_rc, expected):
    repo = _checkout(tmp_path)
    proc = _ci(repo, stub_rc)
    assert proc.returncode == expected, proc.stdout + proc.stderr
    assert (repo / "log.txt").read_text().split() == ["one", "two"]
    assert (tmp_path / "stub.log").read_text().splitlines() == ["python -m pytest -m slow tests"]
    assert ("CI passed" in proc.stdout) == (expected == 0)


def test_a_failing_command_stops_ci(tmp_path):
    repo = _checkout(tmp_path)
    readme = (repo / "README.md").read_text().replace("echo one >> log.txt &&", "echo one >> log.txt && false &&")
    (repo / "README.md").write_text(readme)
    proc = _ci(repo, 0)
    assert proc.returncode != 0
    assert (repo / "log.txt").read_text().split() == ["one"]  # command 2 never ran
    assert not (tmp_path / "stub.log").exists()


def test_commands_that_leave_the_checkout_dirty_fail_ci(tmp_path):
    repo = _checkout(tmp_path, command_2=". .venv/bin/activate && echo two >> log.txt && touch stray.db")
    proc = _ci(repo, 0)
    assert proc.returncode == 1
    assert "changed the checkout" in proc.stderr and "stray.db" in proc.stderr
