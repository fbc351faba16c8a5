#!/usr/bin/env python3
"""Print README.md's numbered quick-start command N, so CI runs exactly what users read.

    python3 scripts/readme_commands.py 1        # prints command 1 (set up, tune, bench)
    python3 scripts/readme_commands.py 2        # prints command 2 (the tests)
    python3 scripts/readme_commands.py --count  # how many numbered commands there are

The commands live in README.md's first ```bash block. Each starts on the line after a comment
``# 1. ...``, ``# 2. ...`` and runs until the next numbered comment or the end of the block;
lines ending in a backslash continue. Standard library only: it runs before any install.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_NUMBERED = re.compile(r"^#\s*(\d+)\.\s")


class ReadmeError(ValueError):
    """README.md does not hold the numbered commands in the expected form."""


def first_bash_block(text: str) -> list[str]:
    """Lines of the first fenced ```bash block of `text` (without the fences)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "```bash":
            for j in range(i + 1, len(lines)):
                if lines[j].strip() == "```":
                    return lines[i + 1:j]
            raise ReadmeError("README.md: the first ```bash block is not closed")
    raise ReadmeError("README.md has no ```bash block")


def numbered_commands(text: str) -> dict[int, str]:
    """{N: command} of the numbered commands in the first ```bash block of `text`."""
    commands: dict[int, list[str]] = {}
    current = None
    for line in first_bash_block(text):
        m = _NUMBERED.match(line.strip())
        if m:
            current = int(m.group(1))
            if current in commands:
                raise ReadmeError(f"README.md: command {current} is numbered twice")
            commands[current] = []
        elif current is not None and line.strip() and not line.lstrip().startswith("#"):
            commands[current].append(line.rstrip())
    out = {}
    for n, body in commands.items():
        if not body:
            raise ReadmeError(f"README.md: command {n} has a comment but no command line")
        out[n] = "\n".join(body)
    if sorted(out) != list(range(1, len(out) + 1)):
        raise ReadmeError(f"README.md: numbered commands are {sorted(out)}, expected 1..{len(out)}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: readme_commands.py N | --count", file=sys.stderr)
        return 2
    try:
        commands = numbered_commands(README.read_text(encoding="utf-8"))
    except (OSError, ReadmeError) as err:
        print(f"readme_commands: error: {err}", file=sys.stderr)
        return 1
    if argv[0] == "--count":
        print(len(commands))
        return 0
    if not argv[0].isdigit() or int(argv[0]) not in commands:
        print(f"readme_commands: error: no command {argv[0]!r} in README.md (have {sorted(commands)})", file=sys.stderr)
        return 2
    print(commands[int(argv[0])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
