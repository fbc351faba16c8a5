#!/usr/bin/env python
"""bench's own tables, printed again from ``bench ... --json`` files (read and validated by ``bench.report``).

    python scripts/results_summary.py bench/results/2026-12-07-h100-c/decode.json [more.json ...]

For reading a device session's results quickly; README's tables are written from the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from bench.report import read_json  # pylint: disable=import-outside-toplevel
    from bench.tables import format_kernel_table, format_table  # pylint: disable=import-outside-toplevel

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    for p in paths:
        result = read_json(p)
        print(f"# {p} ({(result.get('env') or {}).get('date')})")
        print(format_kernel_table(result) if result.get("command") == "kernels" else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
