#!/usr/bin/env python
"""GPU check of the decode attention template (tuning.attention_decode) against NumPy and TVM's kernel.

Builds TVM's own ``batch_decode_paged_kv`` and every candidate of the template for GPT-2 small
(12 heads of 64, fp16, 16-token pages) in MetaSchedule's parallel builder, then, in a child process
(after a crash, a new child goes on from the next kernel: a kernel that faults cannot take the
others down):

* checks output and base-2 lse against the float64 NumPy reference on scattered pages whose unused
  slots hold NaN: every timed case plus a mixed batch (1, 16, 17, 255, 0, 129, 300 tokens);
  passes when output error / max |reference| <= 2e-3 (fp16 output rounding alone is 4.9e-4)
  and |lse error| <= 2e-3 (base 2), everything finite;
* times each kernel at batches 1, 8, 32 with 256 and 129 tokens of context per sequence from
  CUDA-graph replays of 20 back-to-back calls (median of 5; ``time_evaluator``, launch included,
  without torch; the inputs stay L2-resident between calls, for TVM's kernel as for the candidates).

Prints a table of µs per call, the best candidate (geometric mean over the timed cases, among
those that pass the check) and its speedup over TVM's kernel, and writes
``decode_attn_check.json`` into ``--out``. About 1 minute on an H200 with 16 cores.

Usage (GPU machine, repository root, venv active)::

    python scripts/decode_attn_check.py --out $OUT
    python scripts/decode_attn_check.py --out /tmp/x --dry-run   # anywhere: build for sm_90 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

BATCHES = (1, 8, 32)
CONTEXTS = (256, 129)


def _key():
    from tuning.attention import AttentionKey  # pylint: disable=import-outside-toplevel

    return AttentionKey(12, 12, 64, "float16")


def _cases():
    from tuning.attention_decode import MIXED_CASE, decode_cases  # pylint: disable=import-outside-toplevel

    timed = decode_cases(BATCHES, CONTEXTS)
    return {**timed, **MIXED_CASE}, list(timed)


def run_child(specs: list) -> None:
    """In a child: load each built kernel, check it on every case and time the timed ones."""
    import tvm  # pylint: disable=import-outside-toplevel

    from tuning.attention_decode_tune import measure_paged_decode  # pylint: disable=import-outside-toplevel

    dev = tvm.cuda(0)
    cases, timed = _cases()
    cache: dict = {}
    for spec in specs:
        lib = tvm.runtime.load_module(spec["path"])
        r = measure_paged_decode(lib, _key(), cases, device=dev, number=50, repeat=5, timed=timed, cache=cache)
        print("RESULT " + json.dumps({"name": spec["name"], "config": spec["config"], **r}), flush=True)


def build(arch: str | None):
    """(specs, artifact paths) of TVM's kernel and every candidate."""
    from dataclasses import asdict  # pylint: disable=import-outside-toplevel

    from tuning.attention import _build_all  # pylint: disable=import-outside-toplevel
    from tuning.attention_decode import decode_candidates, make_decode_kernel  # pylint: disable=import-outside-toplevel
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel
    from tuning.targets import make_target  # pylint: disable=import-outside-toplevel

    target = make_target(arch or detect_cuda_arch() or "sm_90")
    key = _key()
    cands = decode_candidates(key, target)
    specs = [{"name": "tvm" if c is None else c.label().replace("decode ", "").replace(" ", "_"),
              "config": None if c is None else asdict(c)} for c in cands]
    t0 = time.time()
    paths, errors = _build_all([make_decode_kernel(c, key, target) for c in cands], target,
                               workers=min(16, os.cpu_count() or 1))
    print(f"built {sum(p is not None for p in paths)}/{len(paths)} kernels for {target.attrs['arch']} "
          f"in {time.time() - t0:.0f} s", flush=True)
    failed = [s["name"] for s, p in zip(specs, paths) if p is None]
    if failed:
        print("BUILD FAILED:", ", ".join(failed), flush=True)
    for e in errors[:2]:
        print("BUILD ERROR", "\n".join(e.splitlines()[-6:]), flush=True)
    return specs, paths


def _geomean(xs):
    return float(np.exp(np.mean(np.log(xs))))


def report(results: list, timed: list, out_dir: str) -> dict:
    base = next((r for r in results if r["name"] == "tvm" and "us" in r), None)
    ok = [r for r in results if r.get("ok") and r["name"] != "tvm" and len(r.get("us", {})) == len(timed)]
    for r in ok:
        r["score"] = _geomean([r["us"][c] / base["us"][c] for c in timed]) if base else None
    best = min(ok, key=lambda r: r["score"]) if ok and base else None
    print("\nkernel               " + " ".join(f"{c:>12}" for c in timed) + "   out err   lse err  ok")
    for r in results:
        if "us" not in r:
            print(f"{r['name']:<20} FAILED: {r.get('error', '')[:200]}")
            continue
        print(f"{r['name']:<20} " + " ".join(f"{r['us'].get(c, float('nan')):12.2f}" for c in timed)
              + f"  {r['out_err']:.2e}  {r['lse_err']:.2e}  {'yes' if r['ok'] else 'NO'}")
    best_per_case = {}
    if base:
        for c in timed:
            cands = [r for r in ok if c in r["us"]]
            if cands:
                b = min(cands, key=lambda r: r["us"][c])
                best_per_case[c] = {"name": b["name"], "us": b["us"][c], "tvm_us": base["us"][c],
                                    "speedup": base["us"][c] / b["us"][c]}
    if best:
        print(f"\nbest (geomean over the timed cases): {best['name']}: "
              + ", ".join(f"{c} {base['us'][c]:.2f}->{best['us'][c]:.2f} us ({base['us'][c] / best['us'][c]:.2f}x)"
                          for c in timed)
              + f"; geomean {1 / best['score']:.2f}x over TVM's")
        for c, b in best_per_case.items():
            print(f"  best at {c}: {b['name']} {b['us']:.2f} us ({b['speedup']:.2f}x)")
    else:
        print("\nno candidate passed the check and was timed" + ("" if base else " (TVM's kernel failed)"))
    doc = {"results": results, "timed": timed, "best": best, "best_per_case": best_per_case,
           "tolerances": {"out_rel": 2e-3, "lse_abs": 2e-3}, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(os.path.join(out_dir, "decode_attn_check.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory receiving decode_attn_check.json")
    ap.add_argument("--dry-run", action="store_true", help="build for sm_90 and check the NumPy side; no GPU")
    ap.add_argument("--arch", default=None, help="CUDA arch to build for (default: the local GPU's)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    specs, paths = build("sm_90" if args.dry_run else args.arch)
    cases, timed = _cases()
    if args.dry_run:
        from tuning.attention_decode import paged_decode_args  # pylint: disable=import-outside-toplevel

        for i, (name, lens) in enumerate(cases.items()):  # the inputs and references the GPU run uses
            inp = paged_decode_args(_key(), lens, device=None, seed=i)
            out, lse = inp.reference()
            assert np.isfinite(out).all() and np.isfinite(lse).all(), name
        print(f"dry run: {sum(p is not None for p in paths)}/{len(paths)} built, {len(cases)} references "
              f"finite, in {time.time() - t0:.0f} s")
        sys.exit(0 if all(p is not None for p in paths) else 1)
    results: dict = {}
    todo = []
    for spec, path in zip(specs, paths):
        if path is None:
            results[spec["name"]] = {**spec, "error": "build failed"}
        else:
            todo.append(dict(spec, path=path))
    while todo:  # one child for all kernels; after a crash, a new one from the next kernel on
        p = subprocess.Popen([sys.executable, __file__, "--out", args.out, "--child", json.dumps(todo)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list = []
        for ln in p.stdout:
            if ln.startswith("RESULT "):
                r = json.loads(ln[7:])
                results[r["name"]] = r
                print(f"{r['name']}: ok={r['ok']} out_err={r['out_err']:.2e} lse_err={r['lse_err']:.2e} "
                      + " ".join(f"{c}={u:.2f}" for c, u in r["us"].items()), flush=True)
            else:
                tail = (tail + [ln])[-30:]
        p.wait()
        done = [t for t in todo if t["name"] in results]
        if len(done) < len(todo):
            bad = todo[len(done)]
            results[bad["name"]] = {"name": bad["name"], "config": bad["config"], "error": "".join(tail)[-1500:]}
            print("FAILED", bad["name"], "".join(tail)[-800:], flush=True)
        todo = [t for t in todo if t["name"] not in results]
    report([results[s["name"]] for s in specs], timed, args.out)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
