#!/usr/bin/env python
"""One line per row of ``bench ... --json`` files: variant, test, wall / GPU / graph / kernel ms, tok/s, check.

    python scripts/results_summary.py bench/results/2026-12-07-h100/decode.json [more.json ...]

For reading a device session's results quickly; README's tables are written from the same files.
"""

from __future__ import annotations

import json
import sys


def _med(stats):
    return None if not stats else stats.get("median")


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def summarize(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    gpu = (data.get("env") or {}).get("gpu") or {}
    lines = [f"# {path}: {data.get('command')} on {gpu.get('name', data.get('env', {}).get('device'))} "
             f"at {data.get('env', {}).get('date')}"]
    for r in data.get("rows", []):
        if "variant" not in r:  # a kernel row
            lines.append(f"{r.get('name', '?'):<48} {r.get('bucket', '')!s:<8} x{r.get('weight')} "
                         f"untuned {_fmt(r.get('untuned_us'), '.2f')} tuned {_fmt(r.get('tuned_us'), '.2f')} "
                         f"cublas {_fmt(r.get('cublas_us'), '.2f')} sdpa {_fmt(r.get('sdpa_us'), '.2f')} us")
            continue
        check = ((r.get("build") or {}).get("check") or {})
        lines.append(f"{r['variant']:<14} {r['test']:<12} {r['status']:<6} ms {_fmt(_med(r.get('ms')))} "
                     f"gpu {_fmt(_med(r.get('gpu_ms')))} graph {_fmt(r.get('graph_ms'))} "
                     f"kernels {_fmt(r.get('kernels_ms'))} tok/s {_fmt(_med(r.get('tok_s')), ',.0f')} "
                     f"check {check.get('ok', '-')} {_fmt(check.get('rel_err'), '.1e')}"
                     + (f" ERROR {r.get('error')}" if r.get("error") else ""))
    return lines


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    for p in paths:
        print("\n".join(summarize(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
