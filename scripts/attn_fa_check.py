#!/usr/bin/env python
"""GPU check of the wgmma flash-attention ``batch_prefill_ragged_kv`` (tuning.attention_fa, template ``"fa"``).

For GPT-2 small's attention (12 heads of 64, fp16, causal) at 128 / 512 / 1024 tokens (one
sequence), a ragged batch (77 + 200 + 33 + 1 + 512 tokens) and the same kind of batch with 64 earlier
keys per sequence (kv longer than q, checked only), every FA candidate is checked against a float32
NumPy reference of output and base-2 lse (outputs poisoned with NaN first) and timed, next to the
committed database's stored prefill choice (``databases/sm_90/gpt2-q0f16/attention.json``: the mma.sync
"tc" template) and torch SDPA with the flash backend on the same shapes.

Timing: CUDA-graph replays of 20 back-to-back calls (the TVM kernels captured through
``tvm_ffi.use_torch_stream``, so the FA kernel's host-side tensor-map encoding runs at capture only,
as in the model's CUDA graphs), median of 7 repeats; ``time_evaluator`` (host part included) as
well. SDPA of the ragged batch is the sum of its per-sequence calls (SDPA has no varlen entry).

The kernels run in one child process, restarted past a kernel that faults or hangs (watchdog: 45 s
without progress), so one bad candidate cannot take the others down.

Usage (GPU machine, repository root)::

    PYTHONPATH=$PWD python scripts/attn_fa_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np

LENGTHS = (128, 512, 1024)
RAGGED = (77, 200, 33, 1, 512)
PREFIX = ((200, 264), (77, 141), (5, 69))  # (q_len, kv_len): 64 earlier keys per sequence
H, D = 12, 64
DB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "databases", "sm_90", "gpt2-q0f16")
STALL_S = 45


def reference(q, k, v, q_indptr, kv_indptr, sm_scale):
    """float32 causal output and base-2 lse of the ragged kernel's semantics (NumPy)."""
    out = np.zeros(q.shape, np.float32)
    lse = np.zeros(q.shape[:2], np.float32)
    for b in range(len(q_indptr) - 1):
        qs, qe, ks, ke = q_indptr[b], q_indptr[b + 1], kv_indptr[b], kv_indptr[b + 1]
        s = np.einsum("qhd,khd->hqk", q[qs:qe].astype(np.float32), k[ks:ke].astype(np.float32)) * sm_scale
        nq, nk = qe - qs, ke - ks
        mask = np.arange(nk)[None, :] < (nk - nq + np.arange(nq)[:, None] + 1)
        s = np.where(mask[None], s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - m)
        den = p.sum(axis=-1, keepdims=True)
        out[qs:qe] = np.einsum("hqk,khd->qhd", p / den, v[ks:ke].astype(np.float32))
        lse[qs:qe] = ((m + np.log(den))[..., 0] / math.log(2)).T
    return out, lse


def cases():
    """name -> (q lengths, kv lengths, timed)."""
    out = {str(n): ((n,), (n,), True) for n in LENGTHS}
    out["ragged"] = (RAGGED, RAGGED, True)
    out["prefix"] = (tuple(a for a, _ in PREFIX), tuple(b for _, b in PREFIX), False)
    return out


def make_inputs(qlens, kvlens, seed):
    rng = np.random.default_rng(seed)
    nq, nk = sum(qlens), sum(kvlens)
    q = rng.standard_normal((nq, H, D)).astype(np.float16)
    k = rng.standard_normal((nk, H, D)).astype(np.float16)
    v = rng.standard_normal((nk, H, D)).astype(np.float16)
    qi = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    ki = np.concatenate([[0], np.cumsum(kvlens)]).astype(np.int32)
    return q, k, v, qi, ki


def _events(torch, fn, reps=7):
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return float(np.median(times))


def graph_us(torch, call, calls=20):
    """µs per call of ``call`` replayed from a CUDA graph of ``calls`` back-to-back calls."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(g)):
        for _ in range(calls):
            call()
    g.replay()
    torch.cuda.synchronize()
    return _events(torch, g.replay) / calls


def kernels():
    """name -> (template, config dict) of the kernels this check runs."""
    from tuning import attention as A  # pylint: disable=import-outside-toplevel
    from tuning.attention_fa import FA_CANDIDATES  # pylint: disable=import-outside-toplevel

    out = {c.label(): ("fa", asdict(c)) for c in FA_CANDIDATES}
    try:
        doc = A.read_attention(DB) or {"kernels": []}
        entry = next(e for e in doc["kernels"] if e["kernel"] == A.RAGGED_PREFILL
                     and e["key"] == asdict(A.AttentionKey(H, H, D, "float16")))
        best = entry["best"]
        out["stored: " + A.config_of(best.get("template", "simt"), best["config"]).label()] = (
            best.get("template", "simt"), best["config"])
    except (StopIteration, A.AttentionError, OSError) as err:
        print(f"no stored prefill choice in {DB} ({err}); tc mma 4x64 prefetch instead", flush=True)
        out["tc mma warps=4 tile=64x64 prefetch"] = ("tc", {"num_warps": 4, "tile_k": 64, "prefetch": True, "mma": True})
    return out


def run_child(names, results_path):
    """Check and time the kernels ``names`` (and SDPA under the name ``sdpa``), one JSON line each."""
    import torch  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel

    from gpt2_model import wgmma_build as WB  # pylint: disable=import-outside-toplevel
    from tuning import attention as A  # pylint: disable=import-outside-toplevel
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel
    from tuning.targets import make_target  # pylint: disable=import-outside-toplevel

    WB.install_compile_hook()
    dev = tvm.cuda(0)
    target = make_target(detect_cuda_arch())
    key = A.AttentionKey(H, H, D, "float16")
    table = kernels()
    data = {}
    for i, (name, (qlens, kvlens, timed)) in enumerate(cases().items()):
        q, k, v, qi, ki = make_inputs(qlens, kvlens, seed=i)
        data[name] = (q, k, v, qi, ki, timed, reference(q, k, v, qi, ki, 1 / math.sqrt(D)))
    for name in names:
        with open(results_path + ".started", "w", encoding="utf-8") as f:
            f.write(name)
        row = {"kernel": name, "errors": {}, "graph_us": {}, "te_us": {}}
        if name == "sdpa":
            import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
            from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel

            for case, (q, k, v, qi, ki, timed, _) in data.items():
                if not timed:
                    continue
                tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
                seqs = [(tq[a:b].transpose(0, 1)[None], tk[c:e].transpose(0, 1)[None], tv[c:e].transpose(0, 1)[None])
                        for a, b, c, e in zip(qi[:-1], qi[1:], ki[:-1], ki[1:])]
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    def call(seqs=seqs):
                        for sq, sk, sv in seqs:
                            F.scaled_dot_product_attention(sq, sk, sv, is_causal=True)
                    row["graph_us"][case] = graph_us(torch, call)
        else:
            template, config = table[name]
            t0 = time.time()
            func = A.make_prefill_kernel(A.config_of(template, config), key, target)
            if template == "fa":
                mod = WB.build(func, target).mod
            else:
                mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).mod
            row["build_s"] = time.time() - t0
            fn = mod["main"]
            for case, (q, k, v, qi, ki, timed, (ref_out, ref_lse)) in data.items():
                sm = 1 / math.sqrt(D)
                targs = [torch.from_numpy(x).cuda() for x in (q, qi, k, v, ki)]
                targs += [torch.zeros(len(q), dtype=torch.int32, device="cuda"),
                          torch.zeros(len(qi) - 1, dtype=torch.int32, device="cuda"),
                          torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda"),
                          torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device="cuda")]
                scalars = A.prefill_scalars(sm)
                fn(*targs, *scalars)
                torch.cuda.synchronize()
                out, lse = targs[7].float().cpu().numpy(), targs[8].cpu().numpy()
                bad = not (np.isfinite(out).all() and np.isfinite(lse).all())
                row["errors"][case] = float("inf") if bad else float(max(np.abs(out - ref_out).max(),
                                                                         np.abs(lse - ref_lse).max()))
                if timed:
                    row["graph_us"][case] = graph_us(torch, lambda targs=targs: fn(*targs, *scalars))
                    targs_tvm = [tvm.runtime.from_dlpack(x) for x in targs]
                    te = mod.time_evaluator("main", dev, number=20, repeat=5)
                    row["te_us"][case] = float(np.median(te(*targs_tvm, *scalars).results) * 1e6)
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "attn_fa_rows.jsonl")
    if args.child is not None:
        run_child(args.child, results_path)
        return
    if os.path.exists(results_path):
        os.remove(results_path)
    todo = list(kernels()) + ["sdpa"]
    t_start = time.time()
    failed = {}
    while todo:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, __file__, "--out", args.out, "--child", *todo], env=env)
        seen, last = 0, time.time()
        while proc.poll() is None:
            time.sleep(1)
            done = _rows(results_path)
            if len(done) != seen:
                seen, last = len(done), time.time()
            elif time.time() - last > STALL_S:
                proc.kill()
                proc.wait()
        finished = {r["kernel"] for r in _rows(results_path)}
        todo = [n for n in todo if n not in finished and n not in failed]
        if todo:  # the child died or hung on the kernel it had started
            started = open(results_path + ".started", encoding="utf-8").read() if os.path.exists(
                results_path + ".started") else todo[0]
            failed[started] = f"child exit {proc.returncode} (fault or hang)"
            print(f"{started}: failed ({failed[started]})", flush=True)
            todo = [n for n in todo if n != started]
    rows = _rows(results_path)
    report(rows, failed, args.out, time.time() - t_start)


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def report(rows, failed, out_dir, wall_s):
    timed = [c for c, (_, _, t) in cases().items() if t]
    print(f"\n{'kernel':44} {'max err':>9} " + " ".join(f"{c:>13}" for c in timed) + "   (graph µs / time_evaluator µs)")
    for r in rows:
        err = max(r["errors"].values()) if r["errors"] else float("nan")
        cells = [f"{r['graph_us'].get(c, float('nan')):6.1f}/{r['te_us'].get(c, float('nan')):6.1f}" for c in timed]
        print(f"{r['kernel']:44} {err:9.2e} " + " ".join(f"{x:>13}" for x in cells))
    for name, why in failed.items():
        print(f"{name:44} FAILED: {why}")
    ok = [r for r in rows if r["kernel"].startswith("fa ") and r["errors"] and max(r["errors"].values()) <= 2e-2]
    best = min(ok, key=lambda r: r["graph_us"].get("1024", float("inf")), default=None)
    if best:
        print(f"\nbest FA at 1024 tokens: {best['kernel']} {best['graph_us']['1024']:.1f} µs (graph)")
    try:
        import torch  # pylint: disable=import-outside-toplevel

        gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - the report still gets written
        gpu = "unknown"
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "gpu": gpu, "heads": H, "head_dim": D, "cases": {
        c: {"q": list(q), "kv": list(kv), "timed": t} for c, (q, kv, t) in cases().items()},
        "tolerance_abs": 2e-2, "rows": rows, "failed": failed, "wall_s": wall_s}
    with open(os.path.join(out_dir, "attn_fa_check.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {os.path.join(out_dir, 'attn_fa_check.json')} ({wall_s:.0f} s)")


if __name__ == "__main__":
    main()
