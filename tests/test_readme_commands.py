"""README's two quick-start commands, in order, leave a checkout that passes its own tests (issue 15).

README command 1 (set up, tune the tiny model for this CPU, bench it) runs in a temporary copy of
the checkout, with smaller budgets and the current virtual environment instead of a new one; then
the committed-database test runs in that copy (the pair that failed when command 1 wrote its CPU
database next to the committed ones) and ``git status`` there must show nothing new. The commands
are read from README.md by scripts/readme_commands.py, which is also what ``.ci/run`` runs.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Budget flags of command 1 and the smaller values used here (the layout of what it writes does
#: not depend on them).
SMALL_BUDGETS = {"--trials-per-task": "2", "--gen-len": "4"}
BENCH_EXTRA = ["--repeats", "1", "--warmup", "0"]


def _readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "scripts" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extracts_numbered_commands_from_the_first_bash_block():
    rc = _readme_commands()
    text = ("# title\n\n```python\n# 1. not this one\nx = 1\n```\n\n```bash\n"
            "# 1. set up\npython3 -m venv .venv && \\\n  pip install -e .\n"
            "# 2. the tests\n. .venv/bin/activate && python -m pytest tests\n```\n\n"
            "```bash\n# 3. a later block is not read\nls\n```\n")
    # The first ```bash block, not the first code block; continuation lines stay with their command.
    assert rc.numbered_commands(text) == {1: "python3 -m venv .venv && \\\n  pip install -e .",
                                          2: ". .venv/bin/activate && python -m pytest tests"}
    with pytest.raises(rc.ReadmeError, match="no ```bash block"):
        rc.numbered_commands("no code here\n")
    with pytest.raises(rc.ReadmeError, match="expected 1..2"):
        rc.numbered_commands("```bash\n# 1. a\nls\n# 3. c\nls\n```\n")
    with pytest.raises(rc.ReadmeError, match="command 2 has a comment but no command"):
        rc.numbered_commands("```bash\n# 1. a\nls\n# 2. b\n```\n")


def test_readme_commands_are_the_setup_and_the_test_run():
    """What .ci/run relies on: command 1 installs the project with its test extra (CI does not
    install it again) and runs tune and bench; command 2 is the default test run."""
    commands = _readme_commands().numbered_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(commands) == [1, 2]
    steps = [s.strip() for s in commands[1].split("&&")]
    assert "python3 -m venv .venv" in steps and ". .venv/bin/activate" in steps
    assert "pip install -e '.[test]'" in steps
    assert [s.split()[0] for s in steps if s.split()[0] in ("tune", "bench")] == ["tune", "bench"]
    assert commands[2].split("&&")[-1].split() == ["python", "-m", "pytest", "tests"]


def _copy_checkout(dest: Path) -> None:
    """The tracked files of the working tree (as they are now) in a fresh one-commit git repo."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # tracked but deleted in the working tree: not copied
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy of the checkout"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)


def _small(step: str) -> list[str]:
    argv = shlex.split(step)
    for i, word in enumerate(argv[:-1]):
        if word in SMALL_BUDGETS:
            argv[i + 1] = SMALL_BUDGETS[word]
    if argv[0] == "bench":
        argv += BENCH_EXTRA
    return argv


def _run(argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    print(f"$ {shlex.join(argv)}  -> exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_readme_command_1_then_the_committed_database_test(tmp_path):
    commands = _readme_commands().numbered_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    steps = [s.strip() for s in commands[1].split("&&") if s.split()[0] in ("tune", "bench")]
    copy = tmp_path / "checkout"
    _copy_checkout(copy)
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)  # the copy's code, with the current venv's packages
    env["GPT2K_CACHE_DIR"] = str(tmp_path / "lib-cache")  # no library from an earlier run
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])

    for step in steps:
        argv = _small(step)
        script = bindir / argv[0]
        assert script.is_file(), f"console script {argv[0]} is not installed in {bindir}"
        proc = _run([str(script)] + argv[1:], copy, env, timeout=1800)
        assert proc.returncode == 0, f"README command 1 step `{shlex.join(argv)}` failed (exit {proc.returncode})"

    # every test of the file, its slow ones too (the copy's pyproject deselects those by default)
    proc = _run([sys.executable, "-m", "pytest", "tests/tuning/test_committed_databases.py", "-q",
                 "-m", "slow or not slow", "-p", "no:cacheprovider"], copy, env, timeout=1800)
    assert proc.returncode == 0, ("after README command 1, tests/tuning/test_committed_databases.py fails in the "
                                  "checkout (exit %d)" % proc.returncode)

    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=copy,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"README command 1 left files that git sees in the checkout:\n{status}"
