"""Check the TIRx Hopper wgmma GEMM (``gpt2_model.wgmma_gemm``) on an H100/H200: correctness and speed.

For each GPT-2 linear shape ``C[M, N] = A[M, K] @ W[N, K]^T + bias[N]`` (fp16 in/out, fp32
accumulation; M in {128, 512, 1024}, (N, K) in {(2304, 768), (768, 768), (3072, 768),
(768, 3072)}) and each kernel config (tile M/N/K, stages, consumer warpgroups, warp
specialization), it

1. builds the kernel in spawned worker processes (``gpt2_model.wgmma_gemm.make_wgmma_gemm`` ->
   ``tvm.compile(tir_pipeline="tirx")``, target ``{"kind": "cuda", "arch": "sm_90a"}``; the
   CUDA is compiled to an sm_90a cubin with nvcc -- NVRTC if nvcc is missing -- cached by
   source hash and served to the measuring process), exports a ``.so`` per kernel;
2. runs it on random inputs and compares with a float32 torch reference
   (pass: ``max|C - ref| <= 1e-2 * max|ref| + 1e-2 * |ref|`` elementwise);
3. times it and cuBLAS (``F.linear(A, W, bias)``, i.e. cublasLt with a bias epilogue, and
   ``torch.matmul(A, W.T)``): device time per call from the torch profiler (kernel durations,
   no launch gaps; median over many calls) and wall time of back-to-back launches from CUDA
   events (median of repetitions);
4. prints a table (config, shape, us, TFLOP/s, ratio to cuBLAS) and, with ``--out``, writes
   ``wgmma_check.json`` and the generated CUDA of the first kernel per config.

Usage (GPU machine, repository root; well under 3 minutes with 16 cores)::

    PYTHONPATH=$PWD python scripts/wgmma_check.py --out $OUT
    PYTHONPATH=$PWD python scripts/wgmma_check.py --out $OUT --shapes 1024x2304x768 \\
        --configs 128x128x64s4c2ws,128x192x64s4c2ws,128x256x64s4c2ws

Without a GPU, ``--compile-only`` runs everything up to the launch (build, nvcc to sm_90a,
ptxas register/spill report, source dump).

Config syntax: ``{tile_m}x{tile_n}x{tile_k}s{stages}c{consumers}{ws|nows}`` (e.g.
``128x192x64s4c2ws``); see ``gpt2_model.wgmma_gemm.GemmConfig``. A hung kernel (barrier bug) is
caught by a watchdog that writes the partial JSON and exits with status 3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MS = (128, 512, 1024)
NKS = ((2304, 768), (768, 768), (3072, 768), (768, 3072))
DEFAULT_CONFIGS = (
    "128x128x64s4c2ws",
    "128x192x64s4c2ws",
    "128x256x64s4c2ws",
    "128x128x64s4c2nows",
    "64x128x64s5c1ws",
    "128x64x64s6c2ws",
    "64x64x64s6c1nows",
)


def parse_config(text):
    from gpt2_model.wgmma_gemm import parse_config as parse

    return parse(text)


def parse_shape(text):
    m, n, k = (int(v) for v in text.lower().split("x"))
    return m, n, k


def _last(err):
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


# ------------------------------------------------------------------------------------------
# build (spawned worker processes: no CUDA context is ever created there)
# ------------------------------------------------------------------------------------------


def _build(job):
    """Trace, compile (cubin cached by source hash) and export one (shape, config) kernel."""
    (m, n, k), label, folder, compile_only = job
    t0 = time.time()
    res = {"shape": f"{m}x{n}x{k}", "config": label}
    try:
        import tvm_ffi

        from gpt2_model import wgmma_build as gemm
        from gpt2_model import wgmma_gemm as kernel

        cfg = parse_config(label)
        kernel.check_config(m, n, k, cfg)
        logs = {}

        def _compile(code, *_):
            path = os.path.join(folder, "cubin", hashlib.sha256(code.encode()).hexdigest())
            if os.path.exists(path):
                with open(path, "rb") as f:
                    return bytearray(f.read())
            cubin, log = gemm.compile_cubin(code)
            logs["ptxas"] = log
            with open(path + f".{os.getpid()}", "wb") as f:
                f.write(cubin)
            os.replace(path + f".{os.getpid()}", path)
            return bytearray(cubin)

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)
        func = kernel.make_wgmma_gemm(m, n, k, bias=True, **_cfg_kwargs(cfg))
        ex = gemm.build(func)
        src = gemm.cuda_source(ex)
        res["src_chars"] = len(src)
        res["src_key"] = hashlib.sha256(src.encode()).hexdigest()
        with open(os.path.join(folder, "src", f"{label}__{m}x{n}x{k}.cu"), "w") as f:
            f.write(src)
        if "ptxas" not in logs:  # no CUDA here (CPU machine): tvm.compile kept the source
            _compile(src)
        res.update(gemm.ptxas_summary(logs.get("ptxas", "")))
        if not compile_only:
            so = os.path.join(folder, "so", f"{label}__{m}x{n}x{k}.so")
            try:
                ex.export_library(so)
                res["so"] = so
            except Exception as err:  # noqa: BLE001  (no host compiler: rebuilt in-process)
                res["so"], res["export_error"] = None, _last(err)
        res["ok"] = True
    except Exception as err:  # noqa: BLE001
        res["ok"] = False
        res["error"] = _last(err)
    res["build_s"] = round(time.time() - t0, 2)
    return res


def _cfg_kwargs(cfg):
    return {"tile_m": cfg.tile_m, "tile_n": cfg.tile_n, "tile_k": cfg.tile_k,
            "stages": cfg.stages, "consumers": cfg.consumers,
            "warp_specialized": cfg.warp_specialized}


def build_all(shapes, labels, folder, workers, compile_only, log):
    from gpt2_model.wgmma_gemm import check_config

    os.makedirs(os.path.join(folder, "cubin"), exist_ok=True)
    os.makedirs(os.path.join(folder, "src"), exist_ok=True)
    jobs, skipped = [], []
    for shape in shapes:
        for label in labels:
            try:
                check_config(*shape, parse_config(label))
                jobs.append((shape, label, folder, compile_only))
            except ValueError as err:
                skipped.append({"shape": "x".join(map(str, shape)), "config": label,
                                "ok": False, "skipped": str(err)})
    log(f"building {len(jobs)} kernels ({len(skipped)} config/shape pairs skipped) "
        f"with {workers} workers")
    results = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for res in pool.imap_unordered(_build, jobs, chunksize=1):
            results.append(res)
            if not res["ok"]:
                log(f"  build failed {res['config']} {res['shape']}: {res['error']}")
    return results, skipped


# ------------------------------------------------------------------------------------------
# measure (this process)
# ------------------------------------------------------------------------------------------


class Watchdog:
    """Exit the process (status 3) if a guarded GPU wait takes longer than ``seconds``."""

    def __init__(self, seconds, on_fire):
        self.seconds, self.on_fire = seconds, on_fire

    def sync(self, torch, what):
        timer = threading.Timer(self.seconds, self._fire, args=(what,))
        timer.start()
        try:
            torch.cuda.synchronize()
        finally:
            timer.cancel()

    def _fire(self, what):
        print(f"WATCHDOG: {what} did not finish in {self.seconds}s (hung kernel?)", flush=True)
        try:
            self.on_fire(what)
        finally:
            os._exit(3)


def _serve_cubins(folder):
    import tvm_ffi

    from gpt2_model import wgmma_build as gemm

    def _compile(code, *_):
        path = os.path.join(folder, "cubin", hashlib.sha256(code.encode()).hexdigest())
        if os.path.exists(path):
            with open(path, "rb") as f:
                return bytearray(f.read())
        return bytearray(gemm.compile_cubin(code)[0])

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)


_PROFILER = {"enabled": True}


def time_fn(torch, fn, *, iters, reps, watchdog, what):
    """(device us per call from the profiler or None, wall us per call from CUDA events)."""
    for _ in range(3):
        fn()
    watchdog.sync(torch, what)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        for _ in range(iters):
            fn()
        e.record()
    watchdog.sync(torch, what)
    wall = statistics.median(s.elapsed_time(e) * 1e3 / iters for s, e in zip(starts, ends))
    device = None
    if not _PROFILER["enabled"]:
        return device, wall
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        n = iters * 2
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            watchdog.sync(torch, what)
        durs = [ev.time_range.elapsed_us() for ev in prof.events()
                if ev.device_type == DeviceType.CUDA and "memset" not in ev.name.lower()
                and "memcpy" not in ev.name.lower()]
        if durs:
            per_call = len(durs) / n
            # one kernel per call: the median duration; otherwise the mean total per call
            device = statistics.median(durs) if per_call == 1 else sum(durs) / n
    except Exception as err:  # noqa: BLE001
        print(f"  (profiler timing unavailable, CUDA-event wall times only: {_last(err)})",
              flush=True)
        _PROFILER["enabled"] = False
    return device, wall


def measure(built, shapes, folder, args, log, report):
    import torch
    import tvm
    import tvm.runtime

    _serve_cubins(folder)
    F = torch.nn.functional
    dev = torch.device("cuda")
    log(f"device: {torch.cuda.get_device_name(0)}")
    watchdog = Watchdog(args.hang_seconds, lambda what: report(partial=True))
    deadline = time.time() + args.budget
    by_shape = {}
    for res in built:
        if res.get("ok"):
            by_shape.setdefault(res["shape"], []).append(res)
    cublas = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for m, n, k in shapes:
        key = f"{m}x{n}x{k}"
        a = torch.randn(m, k, generator=gen).half().to(dev)
        w = (torch.randn(n, k, generator=gen) * 0.05).half().to(dev)
        b = (torch.randn(n, generator=gen) * 0.1).half().to(dev)
        ref = (a.float() @ w.float().T + b.float())
        scale = float(ref.abs().max())
        flops = 2.0 * m * n * k
        out_lin = torch.empty(m, n, dtype=torch.float16, device=dev)
        d_lin, w_lin = time_fn(torch, lambda: torch.addmm(b, a, w.T, out=out_lin),
                               iters=args.iters, reps=args.reps, watchdog=watchdog,
                               what=f"cublas addmm {key}")
        out_mm = torch.empty(m, n, dtype=torch.float16, device=dev)
        d_mm, w_mm = time_fn(torch, lambda: torch.matmul(a, w.T, out=out_mm),
                             iters=args.iters, reps=args.reps, watchdog=watchdog,
                             what=f"cublas matmul {key}")
        # F.linear(a, w, b) is addmm(b, a, w.T) for 2-D inputs (cublasLt, bias epilogue); it is
        # timed through addmm(out=) so both sides write a preallocated output.
        lin_err = float((F.linear(a, w, b).float() - ref).abs().max()) / scale
        cublas[key] = {"linear_us": d_lin, "linear_wall_us": w_lin, "matmul_us": d_mm,
                       "matmul_wall_us": w_mm, "linear_rel_err": lin_err}
        base = d_lin if d_lin is not None else w_lin
        log(f"{key}: cuBLAS linear {_fmt(d_lin)} us (wall {_fmt(w_lin)}), "
            f"matmul {_fmt(d_mm)} us (wall {_fmt(w_mm)}), {flops / base / 1e6:.0f} TFLOP/s")
        for res in sorted(by_shape.get(key, []), key=lambda r: r["config"]):
            if time.time() > deadline:
                res["skipped"] = "out of time budget"
                continue
            try:
                if res.get("so"):
                    fn = tvm.runtime.load_module(res["so"])["main"]
                else:  # export failed in the worker: codegen again, cubin from the cache
                    from gpt2_model import wgmma_build as gemm
                    from gpt2_model import wgmma_gemm as kernel

                    cfg = parse_config(res["config"])
                    fn = gemm.build(kernel.make_wgmma_gemm(m, n, k, bias=True,
                                                         **_cfg_kwargs(cfg)))["main"]
                c = torch.zeros(m, n, dtype=torch.float16, device=dev)
                fn(a, w, b, c)
                watchdog.sync(torch, f"{res['config']} {key} first launch")
                got = c.float()
                err = (got - ref).abs()
                res["max_abs_err"] = float(err.max())
                res["max_rel_err"] = float(err.max()) / scale
                res["correct"] = bool(torch.all(err <= 1e-2 * scale + 1e-2 * ref.abs()).item()
                                      and bool(torch.isfinite(got).all().item()))
                dv, wl = time_fn(torch, lambda: fn(a, w, b, c), iters=args.iters,
                                 reps=args.reps, watchdog=watchdog,
                                 what=f"{res['config']} {key}")
                res["us"], res["wall_us"] = dv, wl
                mine = dv if dv is not None else wl
                res["tflops"] = flops / mine / 1e6
                res["ratio_vs_cublas"] = mine / base
                res["wall_ratio_vs_cublas"] = wl / w_lin
            except Exception as err:  # noqa: BLE001
                res["run_error"] = _last(err)
                log(f"  {res['config']} {key}: run failed: {res['run_error']}")
        report(partial=True)
    return cublas


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def print_table(built, cublas, log):
    rows = [r for r in built if r.get("ok")]
    rows.sort(key=lambda r: (r["shape"], r.get("us") or r.get("wall_us") or 1e9))
    hdr = (f"{'shape':>16} {'config':>20} {'us':>8} {'wall us':>8} {'TFLOP/s':>8} "
           f"{'x cuBLAS':>8} {'rel err':>9} {'ok':>3} {'regs':>5}")
    log(hdr)
    log("-" * len(hdr))
    last = None
    for r in rows:
        if r["shape"] != last and r["shape"] in cublas:
            cb = cublas[r["shape"]]
            m, n, k = parse_shape(r["shape"])
            base = cb["linear_us"] if cb["linear_us"] is not None else cb["linear_wall_us"]
            log(f"{r['shape']:>16} {'cuBLAS F.linear':>20} {_fmt(cb['linear_us']):>8} "
                f"{_fmt(cb['linear_wall_us']):>8} {2.0 * m * n * k / base / 1e6:>8.0f} "
                f"{1.0:>8.2f} {cb['linear_rel_err']:>9.1e} {'':>3} {'':>5}")
        last = r["shape"]
        ok = "" if "correct" not in r else ("yes" if r["correct"] else "NO")
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        ratio = f"{r['ratio_vs_cublas']:.2f}" if "ratio_vs_cublas" in r else "-"
        log(f"{r['shape']:>16} {r['config']:>20} {_fmt(r.get('us')):>8} "
            f"{_fmt(r.get('wall_us')):>8} {tf:>8} {ratio:>8} {err:>9} {ok:>3} "
            f"{r.get('registers', '-'):>5}")
    best = {}
    for r in rows:
        if r.get("correct") and "ratio_vs_cublas" in r:
            if r["shape"] not in best or r["ratio_vs_cublas"] < best[r["shape"]]["ratio_vs_cublas"]:
                best[r["shape"]] = r
    if best:
        log("\nbest correct config per shape:")
        for shape, r in sorted(best.items()):
            log(f"  {shape:>16}: {r['config']:>20} {_fmt(r.get('us'))} us, "
                f"{r['ratio_vs_cublas']:.2f}x cuBLAS")
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="folder for wgmma_check.json and kernel sources")
    ap.add_argument("--shapes", default=None,
                    help="comma list MxNxK (default: all 12 GPT-2 linear shapes)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma list of configs, e.g. 128x192x64s4c2ws")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 4))
    ap.add_argument("--iters", type=int, default=30, help="launches per timing repetition")
    ap.add_argument("--reps", type=int, default=7, help="timing repetitions (median)")
    ap.add_argument("--budget", type=float, default=100.0,
                    help="seconds for the measure phase before remaining kernels are skipped")
    ap.add_argument("--hang-seconds", type=float, default=20.0)
    ap.add_argument("--no-profiler", action="store_true",
                    help="time with CUDA events only (includes host launch gaps)")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU: build + nvcc sm_90a + ptxas report + source dump only")
    args = ap.parse_args(argv)

    t_start = time.time()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    else:
        shapes = [(m, n, k) for m in MS for n, k in NKS]
    labels = [s.strip() for s in args.configs.split(",") if s.strip()]
    for label in labels:
        parse_config(label)
    # builds (cubins, sources, exported .so) stay outside --out: only the JSON goes there
    folder = os.path.join("/tmp", f"wgmma_check_{os.getpid()}")
    os.makedirs(os.path.join(folder, "so"), exist_ok=True)

    state = {"built": [], "skipped": [], "cublas": {}}

    def report(partial=False):
        doc = {"args": vars(args), "partial": partial, "seconds": round(time.time() - t_start, 1),
               "cublas": state["cublas"], "kernels": state["built"] + state["skipped"],
               "log": lines}
        if args.out:
            with open(os.path.join(args.out, "wgmma_check.json"), "w") as f:
                json.dump(doc, f, indent=1, default=str)

    built, skipped = build_all(shapes, labels, folder, args.workers, args.compile_only, log)
    state["built"], state["skipped"] = built, skipped
    nok = sum(1 for r in built if r["ok"])
    log(f"built {nok}/{len(built)} in {time.time() - t_start:.0f}s "
        f"(sources: {os.path.join(folder, 'src')})")
    for r in sorted(built, key=lambda r: (r["config"], r["shape"])):
        if r["ok"]:
            log(f"  {r['config']:>20} {r['shape']:>16}: {r['src_chars']} chars CUDA, "
                f"regs {r.get('registers', '?')}, spills {r.get('spill_bytes', '?')} B, "
                f"{r['build_s']}s")
    if args.compile_only:
        report()
        return 0 if nok == len(built) else 1

    _PROFILER["enabled"] = not args.no_profiler
    state["cublas"] = measure(built, shapes, folder, args, log, report)
    best = print_table(built, state["cublas"], log)
    log(f"total {time.time() - t_start:.0f}s")
    report()
    bad = [r for r in built if r.get("ok") and r.get("correct") is False]
    if bad:
        log(f"{len(bad)} kernels gave wrong results")
    return 0 if best and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
