"""Check the mma.sync GEMM space (``tuning.spaces.gemm_mma``) on a GPU: correctness and speed.

For each GPT-2 prefill GEMM (fused epilogues as in the model) it builds N random draws of the
``gemm_mma/*`` design spaces in parallel worker processes (``tvm.compile`` with
``{"tirx.use_async_copy": True}`` so the copy stage is cp.async; the CUDA is compiled to a cubin
in the worker and served to the measuring process through ``tvm_callback_cuda_compile``), runs
each on random inputs, compares it with a NumPy float32 reference (``x @ W.T + b``, erf GELU,
residual add), times the correct ones with ``time_evaluator`` and times torch (cuBLAS
``F.linear`` + the same epilogue; CUDA events, back-to-back and CUDA-graph replays).

Usage (on the GPU machine, from the repository root; < 3 min with 16 cores)::

    PYTHONPATH=$PWD python scripts/mma_check.py --out $OUT [--samples 6] [--only REGEX]

Output: a table on stdout and ``mma_check.json`` in ``--out`` (per kernel: every candidate's
space, decisions, max error, µs; the best; cuBLAS µs; ratio; the best trace).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time

#: name -> (m, n, k, bias, epilogue); the shapes of GPT-2 small (prefill s1024 / s128).
KERNELS = {
    "qkv_1024x768x2304": (1024, 2304, 768, True, None),
    "attn_proj_1024x768x768_res": (1024, 768, 768, True, "residual"),
    "fc1_1024x768x3072_gelu": (1024, 3072, 768, True, "gelu"),
    "fc2_1024x3072x768_res": (1024, 768, 3072, True, "residual"),
    "proj_128x768x768": (128, 768, 768, True, None),
    "lm_head_128x768x50257": (128, 50257, 768, False, None),
}


def _func(name):
    from tuning.spaces import workloads as wl

    m, n, k, bias, epi = KERNELS[name]
    return wl.linear(1, m, n, k, bias=bias, epilogue=epi)


def _last(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


# ------------------------------------------------------------------------------------------
# build (worker processes)
# ------------------------------------------------------------------------------------------


def _build(job):
    """Draw ``num`` candidates of one kernel, build, export and compile each to a cubin."""
    name, seed, num, folder = job
    import tvm
    from tvm.support import nvcc

    from tuning.spaces import gemm_mma, sample_candidates
    from tuning.targets import make_target

    target = make_target("sm_90")
    out, errors = [], {}
    t0 = time.time()
    try:
        cands, stats = sample_candidates(_func(name), target=target, num=num, seed=seed,
                                         include_dlight=False, only=("gemm_mma/",))
    except Exception as err:  # noqa: BLE001
        return name, [], {"error": _last(err)}
    for i, cand in enumerate(cands):
        try:
            with tvm.transform.PassContext(opt_level=3, config=gemm_mma.ASYNC_COPY_CONFIG):
                ex = tvm.compile(cand.sch.mod, target=target)
            src = ex.mod.imports[0].inspect_source()
            cubin = os.path.join(folder, "cubin", hashlib.sha256(src.encode()).hexdigest())
            if not os.path.exists(cubin):
                binary, errs = None, []
                for mode in ("nvcc", "nvrtc"):
                    try:
                        with target:
                            binary = nvcc.compile_cuda(src, target_format="cubin", compiler=mode)
                        break
                    except Exception as err:  # noqa: BLE001
                        errs.append(f"{mode}: {_last(err)}")
                if binary is None:
                    raise RuntimeError("CUDA compile failed: " + " | ".join(errs))
                with open(cubin + f".{os.getpid()}", "wb") as f:
                    f.write(bytes(binary))
                os.replace(cubin + f".{os.getpid()}", cubin)
            path = os.path.join(folder, f"{name}__{seed}_{i}.so")
            ex.export_library(path)
            decisions = [int(v) for inst, v in cand.trace.decisions.items()
                         if inst.kind.name == "SampleCategorical"]
            out.append({"label": f"{cand.space}#{seed}.{i}", "space": cand.space, "so": path,
                        "decisions": decisions, "cp_async": bool(re.search(r"cp\.async\.c[ag]", src)),
                        "trace": str(cand.trace)})
        except Exception as err:  # noqa: BLE001
            msg = _last(err)
            errors[msg] = errors.get(msg, 0) + 1
    return name, out, {"invalid_draws": stats.get("errors", {}), "build_errors": errors,
                       "seconds": round(time.time() - t0, 1)}


def build_all(names, *, samples, workers, folder, deadline, log):
    os.makedirs(os.path.join(folder, "cubin"), exist_ok=True)
    chunk = 2
    jobs = [(n, 1 + 100 * c, min(chunk, samples - c * chunk), folder)
            for c in range((samples + chunk - 1) // chunk) for n in names]
    manifest = {n: {"candidates": [], "stats": []} for n in names}
    pool = mp.get_context("fork").Pool(workers)
    try:
        for name, cands, stats in pool.imap_unordered(_build, jobs, chunksize=1):
            manifest[name]["candidates"].extend(cands)
            manifest[name]["stats"].append(stats)
            if time.time() > deadline:
                log("build phase out of time: measuring what is built")
                break
    finally:
        pool.terminate()
        pool.join()
    return manifest


# ------------------------------------------------------------------------------------------
# measure (this process)
# ------------------------------------------------------------------------------------------


def _serve_cubins(folder):
    import tvm_ffi
    from tvm.support import nvcc

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):  # pylint: disable=unused-variable
        path = os.path.join(folder, "cubin", hashlib.sha256(code.encode()).hexdigest())
        if os.path.exists(path):
            with open(path, "rb") as f:
                return bytearray(f.read())
        return nvcc.tvm_callback_cuda_compile(code)


def _erf(x):
    try:
        from scipy.special import erf  # pylint: disable=import-outside-toplevel

        return erf(x)
    except ImportError:  # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)
        import numpy as np

        s, a = np.sign(x), np.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
                   + 0.254829592) * t * np.exp(-a * a)
        return s * y


def _inputs(name, rng):
    """NumPy inputs (fp16), the float32 NumPy reference, and the torch (cuBLAS) closure."""
    import numpy as np

    m, n, k, bias, epi = KERNELS[name]
    x = rng.standard_normal((1, m, k)).astype("float16")
    w = (rng.standard_normal((n, k)) * 0.02).astype("float16")
    args = [x, w]
    ref = x.astype("float32") @ w.astype("float32").T
    if bias:
        b = (rng.standard_normal((n,)) * 0.1).astype("float16")
        args.append(b)
        ref = ref + b.astype("float32")
    if epi == "gelu":
        ref = 0.5 * ref * (1.0 + _erf(ref / np.sqrt(2.0)))
    elif epi == "residual":
        r = rng.standard_normal((1, m, n)).astype("float16")
        args.append(r)
        ref = ref + r.astype("float32")
    return args, ref.astype("float32"), (m, n, k, bias, epi)


def _time_torch(args, spec, torch):
    F = torch.nn.functional
    _, _, _, bias, epi = spec
    t = [torch.from_numpy(a).cuda() for a in args]

    def run():
        y = F.linear(t[0], t[1], t[2] if bias else None)
        if epi == "gelu":
            y = F.gelu(y)
        elif epi == "residual":
            y = y + t[-1]
        return y

    def events(fn, iters, reps=5):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3 / iters)
        return statistics.median(times)

    plain = events(run, 50)
    graph_us = None
    try:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            run()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(20):
                run()
        graph_us = events(g.replay, 5) / 20
    except Exception:  # noqa: BLE001
        pass
    return plain, graph_us


def measure(manifest, *, deadline, log):
    import numpy as np
    import torch
    import tvm

    dev = tvm.cuda(0)
    results = {}
    for name, entry in manifest.items():
        rng = np.random.default_rng(0)
        args, ref, spec = _inputs(name, rng)
        m, n, k = spec[:3]
        tol = max(0.02 * float(np.abs(ref).max()), 0.05)
        targs = [tvm.runtime.tensor(a, dev) for a in args]
        out = tvm.runtime.tensor(np.zeros((1, m, n), "float16"), dev)
        cands = []
        for c in entry["candidates"]:
            if time.time() > deadline:
                log(f"{name}: out of time")
                break
            rec = {k2: c[k2] for k2 in ("label", "space", "decisions", "cp_async")}
            try:
                f = tvm.runtime.load_module(c["so"])
                f["main"](*targs, out)
                dev.sync()
                err = float(np.abs(out.numpy().astype("float32") - ref).max())
                rec["max_err"] = err
                rec["ok"] = bool(np.isfinite(err) and err <= tol)
                if rec["ok"]:
                    tf = f.time_evaluator("main", dev, number=20, repeat=7, min_repeat_ms=2)
                    rec["us"] = float(np.median(tf(*targs, out).results)) * 1e6
            except Exception as err:  # noqa: BLE001
                rec["ok"], rec["error"] = False, _last(err)
            cands.append((rec, c["trace"]))
        torch_us, torch_graph_us = _time_torch(args, spec, torch)
        good = [(r, t) for r, t in cands if r.get("us") is not None]
        best, best_trace = min(good, key=lambda rt: rt[0]["us"]) if good else (None, None)
        cublas = torch_graph_us or torch_us
        results[name] = {
            "shape": {"m": m, "n": n, "k": k, "bias": spec[3], "epilogue": spec[4]},
            "tolerance": tol,
            "candidates": [r for r, _ in cands],
            "n_built": len(entry["candidates"]),
            "n_correct": sum(1 for r, _ in cands if r.get("ok")),
            "wrong": [r["label"] for r, _ in cands if not r.get("ok")],
            "build_stats": entry["stats"],
            "best": best, "best_trace": best_trace,
            "cublas_us": torch_us, "cublas_graph_us": torch_graph_us,
            "ratio_to_cublas": (best["us"] / cublas) if best and cublas else None,
            "best_tflops": (2.0 * m * n * k / (best["us"] * 1e-6) / 1e12) if best else None,
        }
        log(f"{name}: {results[name]['n_correct']}/{len(cands)} correct, best "
            f"{best['us'] if best else float('nan'):.2f} us ({best['label'] if best else '-'}), "
            f"cuBLAS {cublas:.2f} us, ratio {results[name]['ratio_to_cublas'] or float('nan'):.2f}")
    return results


def table(results) -> str:
    rows = [f"{'kernel':32} {'ok':>7} {'best us':>9} {'cuBLAS us':>10} {'ratio':>6} {'TFLOP/s':>8}  best"]
    for name, r in results.items():
        b = r["best"]
        rows.append(f"{name:32} {r['n_correct']:>3}/{len(r['candidates']):<3} "
                    f"{(b['us'] if b else float('nan')):>9.2f} "
                    f"{(r['cublas_graph_us'] or r['cublas_us']):>10.2f} "
                    f"{(r['ratio_to_cublas'] or float('nan')):>6.2f} "
                    f"{(r['best_tflops'] or float('nan')):>8.1f}  {b['label'] if b else '-'}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for mma_check.json (and build files)")
    ap.add_argument("--samples", type=int, default=6, help="random draws per kernel (default 6)")
    ap.add_argument("--only", default=None, help="regex on kernel names")
    ap.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    ap.add_argument("--budget-s", type=float, default=170.0, help="total wall budget (default 170)")
    ap.add_argument("--build-only", action="store_true",
                    help="stop after the build phase (plumbing check on a machine without a GPU)")
    a = ap.parse_args(argv)
    if a.samples < 1:
        ap.error("--samples must be >= 1")
    names = [n for n in KERNELS if a.only is None or re.search(a.only, n)]
    if not names:
        ap.error(f"--only {a.only!r} matches no kernel of {list(KERNELS)}")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    folder = os.path.join(a.out, "mma_build")
    manifest = build_all(names, samples=a.samples, workers=a.workers, folder=folder,
                         deadline=t0 + 0.6 * a.budget_s, log=log)
    log(f"built {sum(len(m['candidates']) for m in manifest.values())} candidates")
    for n, m in manifest.items():
        log(f"  {n}: {len(m['candidates'])} built; {m['stats']}")
    if a.build_only:
        return 0 if all(m["candidates"] for m in manifest.values()) else 1
    _serve_cubins(folder)
    results = measure(manifest, deadline=t0 + a.budget_s - 15, log=log)
    with open(os.path.join(a.out, "mma_check.json"), "w") as f:
        json.dump({"seconds": round(time.time() - t0, 1), "results": results}, f, indent=1)
    print(table(results))
    wrong = sum(len(r["wrong"]) for r in results.values())
    log(f"done: {wrong} wrong candidates; JSON in {os.path.join(a.out, 'mma_check.json')}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
