#!/usr/bin/env python
"""GPU check of the tensor-core ``batch_prefill_ragged_kv`` (tuning.attention_tc) against NumPy,
TVM's SIMT kernel and torch SDPA (flash).

Builds every tensor-core candidate and TVM's SIMT kernel (its default constants and the committed
database's tuned ones) in MetaSchedule's parallel builder, then, one child process per kernel (a
kernel that faults cannot take the others down):

* checks output and base-2 lse against a float32 NumPy reference: one causal sequence of
  128/512/1024 tokens (12 heads of 64, GPT-2 small), a ragged batch of 2 sequences (200 + 777
  tokens), the same batch with 64 earlier keys per sequence (kv longer than q), a non-causal
  128-token case and a grouped-query case (h_kv=2, h_q=4; its own build);
* times each kernel at 128/512/1024 with ``time_evaluator`` (median of repeats of back-to-back
  launches), and torch SDPA with the flash backend on the same shapes (CUDA events around
  back-to-back launches, median of repeats).

Usage (GPU machine; tuning/ on PYTHONPATH)::

    python attn_tc_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

LENGTHS = (128, 512, 1024)
SIMT_TUNED = {"num_blks": 32, "tile_x": 16, "tile_z": 64, "num_warps": 4, "load_vec": 4}  # committed gpt2 db


def reference(q, k, v, q_indptr, kv_indptr, causal, sm_scale):
    """float32 output and base-2 lse of the ragged kernel's semantics (NumPy)."""
    group = q.shape[1] // k.shape[1]
    out = np.zeros(q.shape, np.float32)
    lse = np.zeros(q.shape[:2], np.float32)
    for b in range(len(q_indptr) - 1):
        qs, qe, ks, ke = q_indptr[b], q_indptr[b + 1], kv_indptr[b], kv_indptr[b + 1]
        qb = q[qs:qe].astype(np.float32)
        kb = np.repeat(k[ks:ke].astype(np.float32), group, axis=1)
        vb = np.repeat(v[ks:ke].astype(np.float32), group, axis=1)
        s = np.einsum("qhd,khd->hqk", qb, kb) * sm_scale
        nq, nk = qe - qs, ke - ks
        if causal:
            mask = np.arange(nk)[None, :] < (nk - nq + np.arange(nq)[:, None] + 1)
            s = np.where(mask[None], s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - m)
        den = p.sum(axis=-1, keepdims=True)
        out[qs:qe] = np.einsum("hqk,khd->qhd", p / den, vb)
        lse[qs:qe] = ((m + np.log(den))[..., 0] / math.log(2)).T
    return out, lse


def cases(h_kv, h_q):
    """(name, q lengths, kv lengths, causal) of the correctness cases for one key."""
    if h_kv != h_q:
        return [("gqa_ragged_2", (77, 300), (77, 300), 1)]
    return ([(f"causal_{n}", (n,), (n,), 1) for n in LENGTHS]
            + [("ragged_2", (200, 777), (200, 777), 1), ("ragged_2_past64", (200, 777), (264, 841), 1),
               ("noncausal_128", (128,), (128,), 0)])


_REFS: dict = {}


def run_one(spec: dict) -> dict:
    """In a child: load one built kernel, check it on every case, time it (lengths of its key)."""
    import tvm  # pylint: disable=import-outside-toplevel

    dev = tvm.cpu() if spec.get("cpu") else tvm.cuda(0)
    lib = tvm.runtime.load_module(spec["path"])
    fn = lib["main"]
    h_kv, h_q, d = spec["h_kv"], spec["h_q"], 64
    sm_scale = 1.0 / math.sqrt(d)
    nd = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    res = {"name": spec["name"], "checks": {}, "us": {}}
    rng = np.random.default_rng(0)

    def make(qlens, kvlens):
        q = rng.standard_normal((sum(qlens), h_q, d)).astype("float16")
        k = rng.standard_normal((sum(kvlens), h_kv, d)).astype("float16")
        v = rng.standard_normal((sum(kvlens), h_kv, d)).astype("float16")
        qi = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
        ki = np.concatenate([[0], np.cumsum(kvlens)]).astype(np.int32)
        args = [nd(q), nd(qi), nd(k), nd(v), nd(ki), nd(np.zeros(sum(qlens), np.int32)),
                nd(np.zeros(len(qlens), np.int32)), nd(np.zeros(q.shape, "float16")),
                nd(np.zeros(q.shape[:2], np.float32))]
        return q, k, v, qi, ki, args

    for name, qlens, kvlens, causal in cases(h_kv, h_q):
        q, k, v, qi, ki, args = make(qlens, kvlens)
        fn(*args, causal, 0, 1.0, 1.0, sm_scale)
        dev.sync()
        ck = (name, h_kv, h_q)  # same seeded inputs for every kernel of a key: one reference
        if ck not in _REFS:
            _REFS[ck] = reference(q, k, v, qi, ki, causal, sm_scale)
        ref, ref_lse = _REFS[ck]
        out, lse = args[7].numpy().astype(np.float32), args[8].numpy()
        res["checks"][name] = {"out_err": float(np.abs(out - ref).max()), "lse_err": float(np.abs(lse - ref_lse).max()),
                               "finite": bool(np.isfinite(out).all() and np.isfinite(lse).all())}
        if name.startswith("causal_") and not spec.get("cpu"):
            n = qlens[0]
            te = lib.time_evaluator("main", dev, number=20, repeat=7)
            r = te(*args, causal, 0, 1.0, 1.0, sm_scale)
            res["us"][n] = float(np.median(r.results) * 1e6)
    return res


def time_sdpa() -> dict:
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel

    out = {}
    for n in LENGTHS:
        q, k, v = (torch.randn(1, 12, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            for _ in range(10):
                f()
            torch.cuda.synchronize()
            times = []
            for _ in range(7):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(20):
                    f()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) * 1e3 / 20)
            out[n] = float(np.median(times))
    return out


def _cpu_smoke_kernels(out: str):
    """TVM's CPU kernel in place of the GPU ones: tests this script's checks and plumbing anywhere."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu  # pylint: disable=import-outside-toplevel

    specs = []
    for h_kv, h_q in ((12, 12), (2, 4)):
        f = _attention_prefill_ragged_cpu(h_kv, h_q, 64, 64, "float16", {})
        path = os.path.join(out, f"cpu_{h_kv}_{h_q}.so")
        tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target="llvm").export_library(path)
        specs.append({"name": f"cpu_{h_kv}_{h_q}", "h_kv": h_kv, "h_q": h_q, "cpu": True})
    return specs, [os.path.join(out, f"{s['name']}.so") for s in specs]


def _build_kernels(build_only: bool, only: str = "all"):
    """Every tensor-core candidate, TVM's SIMT kernel (default and tuned constants), and a GQA pair;
    with ``only="mma"``: the mma.sync candidates, the committed wmma choice, TVM's default and an
    mma GQA pair."""
    from tuning.attention import AttentionKey, PrefillConfig, _build_all, make_ragged_prefill  # pylint: disable=import-outside-toplevel
    from tuning.attention_tc import TCConfig, make_tc_ragged_prefill, mma_candidates, tc_candidates  # pylint: disable=import-outside-toplevel
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel
    from tuning.targets import make_target  # pylint: disable=import-outside-toplevel

    target = make_target("sm_90" if build_only else (detect_cuda_arch() or "sm_90"))
    key = AttentionKey(12, 12, 64, "float16")
    gqa = AttentionKey(2, 4, 64, "float16")
    specs, funcs = [], []
    tcs = (tc_candidates(key, target) if only == "all"
           else [TCConfig(1, 16, prefetch=True, kv_warps=4)] + mma_candidates(key, target))
    for c in tcs:
        specs.append({"name": c.label().replace(" ", "_"), "h_kv": 12, "h_q": 12})
        funcs.append(make_tc_ragged_prefill(c, key, target))
    specs.append({"name": "simt_default", "h_kv": 12, "h_q": 12})
    funcs.append(make_ragged_prefill(None, key, target))
    if only == "all":
        specs.append({"name": "simt_tuned", "h_kv": 12, "h_q": 12})
        funcs.append(make_ragged_prefill(PrefillConfig(**SIMT_TUNED), key, target))
    gqa_cfg = TCConfig(2, 64, prefetch=True, mma=only == "mma")
    specs.append({"name": f"tc_gqa_{gqa_cfg.label().replace(' ', '_')}", "h_kv": 2, "h_q": 4})
    funcs.append(make_tc_ragged_prefill(gqa_cfg, gqa, target))
    specs.append({"name": "simt_gqa", "h_kv": 2, "h_q": 4})
    funcs.append(make_ragged_prefill(None, gqa, target))
    t0 = time.time()
    paths, errors = _build_all(funcs, target, workers=min(16, os.cpu_count() or 1))
    print(f"built {sum(p is not None for p in paths)}/{len(paths)} in {time.time() - t0:.0f}s", flush=True)
    for e in errors[:2]:
        print("BUILD ERROR", "\n".join(e.splitlines()[-6:]), flush=True)
    return specs, paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", default=None)
    ap.add_argument("--build-only", action="store_true", help="build for sm_90 and stop (no GPU needed)")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the checks on TVM's CPU kernel (plumbing test)")
    ap.add_argument("--only", choices=("all", "mma"), default="all",
                    help="mma: only the mma.sync candidates (with the committed wmma choice and TVM's default)")
    args = ap.parse_args()
    if args.child:
        for spec in json.loads(args.child):
            print("RESULT " + json.dumps(run_one(spec)), flush=True)
        return
    specs, paths = _cpu_smoke_kernels(args.out) if args.cpu_smoke else _build_kernels(args.build_only, args.only)
    if args.build_only:
        return
    results, todo = {}, []
    for spec, path in zip(specs, paths):
        if path is None:
            results[spec["name"]] = {"name": spec["name"], "error": "build failed"}
        else:
            todo.append(dict(spec, path=path))
    while todo:  # one child for all kernels; after a crash, a new one from the next kernel on
        p = subprocess.Popen([sys.executable, __file__, "--out", args.out, "--child", json.dumps(todo)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        for ln in p.stdout:
            if ln.startswith("RESULT "):
                r = json.loads(ln[7:])
                results[r["name"]] = r
                print(json.dumps(r), flush=True)
            else:
                tail = (tail + [ln])[-30:]
        p.wait()
        done = [t for t in todo if t["name"] in results]
        if len(done) < len(todo):
            bad = todo[len(done)]
            results[bad["name"]] = {"name": bad["name"], "error": "".join(tail)[-1500:]}
            print("FAILED", bad["name"], "".join(tail)[-800:], flush=True)
        todo = [t for t in todo if t["name"] not in results]
    results = [results[s["name"]] for s in specs]
    try:
        sdpa = {} if args.cpu_smoke else time_sdpa()
    except Exception as err:  # noqa: BLE001 - report, keep the kernel results
        sdpa = {"error": str(err)}
    print("SDPA flash", sdpa, flush=True)
    doc = {"results": results, "sdpa_flash_us": sdpa, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(os.path.join(args.out, "attn_tc_check.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print("\nkernel                          " + "  ".join(f"{n:>8}" for n in LENGTHS) + "   max out err / lse err")
    for r in results:
        if "us" in r:
            errs = max(c["out_err"] for c in r["checks"].values()), max(c["lse_err"] for c in r["checks"].values())
            print(f"{r['name']:<32}" + "  ".join(f"{r['us'].get(str(n), r['us'].get(n, float('nan'))):8.1f}"
                                                for n in LENGTHS) + f"   {errs[0]:.4f} / {errs[1]:.4f}")
    if sdpa and "error" not in sdpa:
        print(f"{'torch SDPA flash':<32}" + "  ".join(f"{sdpa[n]:8.1f}" for n in LENGTHS))


if __name__ == "__main__":
    main()
