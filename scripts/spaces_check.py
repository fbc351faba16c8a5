#!/usr/bin/env python
"""GPU check of the tunable design spaces (``tuning.spaces``) against dlight and cuBLAS.

For each representative GPT-2 kernel (decode GEMVs at batch 1/8/32 for every linear of GPT-2
small, q4f16_1 GEMVs at batch 8, prefill GEMMs of 1024 tokens incl. the lm_head with N = 50257,
layer norms) this script

1. builds, in a pool of worker processes: dlight's schedule of the static function (what a
   bucket build gets untuned), dlight's schedule of the symbolic-shape function (what the dynamic
   untuned build runs at this shape), MLC-LLM's ``LowBatchGEMV`` on the symbolic function (for
   decode GEMVs), and ``--samples`` random draws from the tunable spaces (random search: each draw
   re-samples every knob and passes MetaSchedule's postprocessors);
2. in a measuring child process (restarted past a kernel that kills the CUDA context): checks
   every build against a float32 torch reference on random inputs (a candidate is wrong when its
   max abs error exceeds max(2 x dlight's error, 2 % of max |ref|)), times it with
   ``time_evaluator`` (median of repeats, back-to-back launches), and times torch/cuBLAS
   (``F.linear`` + the same epilogue) back-to-back and under a CUDA graph;
3. prints a table and writes ``spaces_check.json`` / ``spaces_check.txt`` into ``--out``.

Usage (GPU machine, repo root on PYTHONPATH)::

    python scripts/spaces_check.py --out $OUT [--samples 48] [--only REGEX] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

#: "cuda" normally; "cpu" only for --selftest-cpu (the unscheduled kernels built for llvm stand
#: in for every build, to exercise this script's plumbing on a machine without a GPU).
DEVICE = os.environ.get("SPACES_CHECK_DEVICE", "cuda")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    """One representative kernel: how to build it (static and symbolic) and what it computes."""

    name: str
    kind: str  # linear | q4 | layer_norm
    rows: int  # batch (decode) or tokens (prefill)
    n: int = 0
    k: int = 0
    bias: bool = True
    epilogue: str | None = None  # None | gelu | residual
    decode: bool = True
    extra: dict = field(default_factory=dict)

    def static(self):
        from tuning.spaces import workloads as wl

        return self._make(wl, self.rows)

    def symbolic(self):
        from tuning.spaces import workloads as wl

        return self._make(wl, "b" if self.decode else "m")

    def _make(self, wl, r):
        b, m = (r, 1) if self.decode else (1, r)
        if self.kind == "linear":
            return wl.linear(b, m, self.n, self.k, bias=self.bias, epilogue=self.epilogue)
        if self.kind == "q4":
            return wl.q4_linear(b, m, self.n, self.k, bias=self.bias)
        if self.kind == "layer_norm":
            return wl.layer_norm(b, m, self.n)
        raise ValueError(self.kind)


def kernel_list() -> list[Kernel]:
    """GPT-2 small (n_embd 768, n_inner 3072, vocab 50257)."""
    shapes = [  # name, n, k, bias, epilogue
        ("qkv", 2304, 768, True, None),
        ("attn_proj", 768, 768, True, "residual"),
        ("fc1_gelu", 3072, 768, True, "gelu"),
        ("fc2", 768, 3072, True, "residual"),
        ("lm_head", 50257, 768, False, None),
    ]
    out = []
    for b in (8,):
        for name, n, k, bias, epi in shapes:
            out.append(Kernel(f"gemv_b{b}_{name}", "linear", b, n, k, bias, epi, decode=True))
    for name, n, k in (("qkv", 2304, 768), ("fc2", 768, 3072)):
        out.append(Kernel(f"q4_gemv_b8_{name}", "q4", 8, n, k, True, None, decode=True))
    for name, n, k, bias, epi in (("qkv", 2304, 768, True, None), ("fc2", 768, 3072, True, "residual"),
                                  ("lm_head", 50257, 768, False, None)):
        out.append(Kernel(f"gemm_s1024_{name}", "linear", 1024, n, k, bias, epi, decode=False))
    for b in (1, 32):
        for name, n, k, bias, epi in shapes:
            out.append(Kernel(f"gemv_b{b}_{name}", "linear", b, n, k, bias, epi, decode=True))
    out.append(Kernel("layer_norm_s1024", "layer_norm", 1024, 768, decode=False))
    out.append(Kernel("layer_norm_b8", "layer_norm", 8, 768, decode=True))
    return out


def kernels_by_name() -> dict[str, Kernel]:
    return {k.name: k for k in kernel_list()}


def _target():
    from tuning.targets import make_target

    if DEVICE == "cpu":
        import tvm

        return tvm.target.Target({"kind": "llvm"})
    return make_target("sm_90")


def _selftest_build(func, folder, label):
    import tvm

    path = os.path.join(folder, f"{label}.so")
    tvm.compile(tvm.IRModule({"main": func}), target=_target()).export_library(path)
    return path


# ------------------------------------------------------------------------------------------
# stage A: builds (worker processes; no CUDA context in the parent)
# ------------------------------------------------------------------------------------------


def _decisions(trace) -> list:
    out = []
    for inst, dec in trace.decisions.items():
        if inst.kind.name == "SamplePerfectTile":
            out.append([int(d) for d in dec])
        elif inst.kind.name == "SampleCategorical":
            out.append(int(inst.attrs[0][int(dec)]))
    return out


def _build_baselines(job):
    """dlight static / symbolic / LowBatchGEMV builds of one kernel."""
    name, folder = job
    import tvm
    from tvm.s_tir import dlight as dl

    from tuning.untuned import untuned_schedule

    kern = kernels_by_name()[name]
    target = _target()
    out = []
    if DEVICE == "cpu":
        for label in ("dlight_static", "dlight_symbolic"):
            out.append({"label": label, "rule": "unscheduled",
                        "so": _selftest_build(kern.static(), folder, f"{name}__{label}")})
        return name, out
    variants = [("dlight_static", kern.static(), None), ("dlight_symbolic", kern.symbolic(), None)]
    if kern.decode and kern.kind in ("linear", "q4"):
        variants.append(("lowbatchgemv_symbolic", kern.symbolic(), [dl.gpu.LowBatchGEMV()]))
    for label, func, rules in variants:
        t0 = time.time()
        try:
            sch = untuned_schedule(tvm.IRModule({"main": func}), target=target, rules=rules)
            if sch is None:
                out.append({"label": label, "error": "no rule applies"})
                continue
            rule = _rule_name(func, target, rules)
            ex = tvm.compile(sch.mod, target=target)
            path = os.path.join(folder, f"{name}__{label}.so")
            ex.export_library(path)
            if DEVICE == "cuda":
                _cache_cubin(ex, folder, target)
            out.append({"label": label, "so": path, "rule": rule, "build_s": time.time() - t0})
        except Exception as err:  # noqa: BLE001
            out.append({"label": label, "error": _last(err)})
    return name, out


def _rule_name(func, target, rules):
    from tuning.untuned import dlight_rules

    rules = dlight_rules(target) if rules is None else rules
    mod = __import__("tvm").IRModule({"main": func})
    with target:
        for r in rules:
            if r.apply(mod["main"], target, False) is not None:
                return type(r).__name__
    return None


def _build_candidates(job):
    """``num`` random draws from the tunable spaces of one kernel, built and exported."""
    name, seed, num, folder, generic = job
    import tvm

    from tuning.spaces import sample_candidates

    kern = kernels_by_name()[name]
    target = _target()
    t0 = time.time()
    out = []
    if DEVICE == "cpu":
        for i in range(num):
            path = _selftest_build(kern.static(), folder, f"{name}__s{seed}_{i}{'g' if generic else ''}")
            out.append({"label": f"selftest#{seed}.{i}", "space": "generic" if generic else "selftest",
                        "so": path, "decisions": [i], "trace": "unscheduled"})
        return name, out, {"selftest": True}
    try:
        cands, stats = sample_candidates(kern.static(), target=target, num=num, seed=seed,
                                         include_dlight=False, include_generic=generic,
                                         only=("generic/",) if generic else None)
    except Exception as err:  # noqa: BLE001
        return name, [], {"error": _last(err)}
    for i, cand in enumerate(cands):
        try:
            ex = tvm.compile(cand.sch.mod, target=target)
            path = os.path.join(folder, f"{name}__s{seed}_{i}.so")
            ex.export_library(path)
            if DEVICE == "cuda":
                _cache_cubin(ex, folder, target)
            out.append({"label": f"{cand.space}#{seed}.{i}",
                        "space": "generic" if cand.space.startswith("generic/") else cand.space, "so": path,
                        "decisions": _decisions(cand.trace), "trace": str(cand.trace)})
        except Exception as err:  # noqa: BLE001
            stats.setdefault("build_errors", {})
            msg = _last(err)
            stats["build_errors"][msg] = stats["build_errors"].get(msg, 0) + 1
    stats["seconds"] = time.time() - t0
    return name, out, stats


def _cache_cubin(ex, folder: str, target) -> None:
    """Compile the CUDA source of a built module to a cubin now (in the worker) and cache it by
    the source's hash: TVM 0.27 keeps CUDA *source* in the module and compiles it when the module
    is loaded (``tvm_callback_cuda_compile``), which would serialize every compile in the
    measuring process; that process looks the cubins up here instead."""
    import hashlib

    from tvm.support import nvcc

    src = ex.mod.imports[0].inspect_source()
    path = os.path.join(folder, "cubin", hashlib.sha256(src.encode()).hexdigest() + ".cubin")
    if os.path.exists(path):
        return
    modes = [os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc")]
    modes += [m for m in ("nvrtc", "nvcc") if m not in modes]
    errors = []
    binary = None
    for mode in modes:
        try:
            with target:
                binary = nvcc.compile_cuda(src, target_format="cubin", compiler=mode)
            break
        except Exception as err:  # noqa: BLE001
            errors.append(f"{mode}: {_last(err)}")
    if binary is None:
        raise RuntimeError("CUDA compile failed: " + " | ".join(errors))
    tmp = path + f".{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(bytes(binary))
    os.replace(tmp, path)


def _install_cubin_cache(folder: str) -> dict:
    """In the measuring process: serve ``tvm_callback_cuda_compile`` from the cubin cache."""
    import hashlib

    import tvm_ffi
    from tvm.support import nvcc

    counts = {"hit": 0, "miss": 0}

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):  # pylint: disable=unused-variable
        path = os.path.join(folder, "cubin", hashlib.sha256(code.encode()).hexdigest() + ".cubin")
        if os.path.exists(path):
            counts["hit"] += 1
            with open(path, "rb") as f:
                return bytearray(f.read())
        counts["miss"] += 1
        return nvcc.tvm_callback_cuda_compile(code)

    return counts


def _last(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def build_all(names: list[str], *, samples: int, generic_samples: int, workers: int, folder: str,
              deadline: float, log) -> dict:
    """Build every baseline and candidate; returns the manifest ``{kernel: {...}}``.

    Jobs are ordered baselines first, then candidate chunks round-robin over the kernels, and the
    phase stops at ``deadline`` (pool terminated), so a slow machine still yields some candidates
    for every kernel.
    """
    chunk = 8
    jobs = [("b", (n, folder)) for n in names]
    for c in range(math.ceil(samples / chunk)):
        for n in names:
            jobs.append(("c", (n, 1 + 1000 * c, min(chunk, samples - c * chunk), folder, False)))
    matmuls = [n for n in names if kernels_by_name()[n].kind in ("linear", "q4")]
    for c in range(math.ceil(generic_samples / chunk)):
        for n in matmuls:
            jobs.append(("c", (n, 500001 + 1000 * c, min(chunk, generic_samples - c * chunk), folder, True)))
    manifest = {n: {"baselines": [], "candidates": [], "stats": []} for n in names}
    os.makedirs(os.path.join(folder, "cubin"), exist_ok=True)
    ctx = mp.get_context("fork")
    t0 = time.time()
    pool = ctx.Pool(workers)
    try:
        for res in pool.imap_unordered(_build_job, jobs, chunksize=1):
            if res[0] == "b":
                manifest[res[1]]["baselines"] = res[2]
            else:
                manifest[res[1]]["candidates"].extend(res[2])
                manifest[res[1]]["stats"].append(res[3])
            if time.time() > deadline:
                log("build phase out of time: using what is built")
                break
    finally:
        pool.terminate()
        pool.join()
    log(f"built {sum(len(m['candidates']) for m in manifest.values())} candidates and "
        f"{sum(len(m['baselines']) for m in manifest.values())} baselines in {time.time() - t0:.0f} s")
    for n, m in manifest.items():
        errs, inv = {}, {}
        for st in m["stats"]:
            for k, v in st.get("build_errors", {}).items():
                errs[k] = errs.get(k, 0) + v
            for k, v in st.get("errors", {}).items():
                inv[k] = inv.get(k, 0) + v
        bad = [b["label"] + ": " + b["error"] for b in m["baselines"] if "error" in b]
        if errs or bad:
            log(f"  {n}: build errors {errs} {bad}")
        log(f"  {n}: {len(m['candidates'])} candidates; invalid draws {inv}")
    return manifest


def _build_job(job):
    kind, args = job
    if kind == "b":
        return ("b", *_build_baselines(args))
    return ("c", *_build_candidates(args))


# ------------------------------------------------------------------------------------------
# stage B: measure (child process)
# ------------------------------------------------------------------------------------------


def _inputs(kern: Kernel, func, torch, gen, dev="cuda"):
    """Random inputs for ``func``'s params (torch tensors on ``dev``; q4 packed words as a
    ``("np", uint32 array)`` pair), the output buffer, the float32 reference and the torch
    (cuBLAS) implementation."""
    import numpy as np

    params = [p for p in func.params]
    shapes = [tuple(int(d) for d in p.shape) for p in params]
    F = torch.nn.functional
    if kern.kind == "linear":
        x = torch.randn(shapes[0], generator=gen, device=dev).half()
        w = (torch.randn(shapes[1], generator=gen, device=dev) * 0.02).half()
        args = [x, w]
        ref = x.float() @ w.float().T
        i = 2
        if kern.bias:
            bias = (torch.randn(shapes[i], generator=gen, device=dev) * 0.1).half()
            args.append(bias)
            ref = ref + bias.float()
            i += 1
        if kern.epilogue == "gelu":
            ref = F.gelu(ref)
        elif kern.epilogue == "residual":
            r = torch.randn(shapes[i], generator=gen, device=dev).half()
            args.append(r)
            ref = ref + r.float()

        def cublas():
            y = F.linear(args[0], args[1], args[2] if kern.bias else None)
            if kern.epilogue == "gelu":
                y = F.gelu(y)
            elif kern.epilogue == "residual":
                y = y + args[-1]
            return y

    elif kern.kind == "q4":
        n, kk = kern.n, kern.k
        x = torch.randn(shapes[0], generator=gen, device=dev).half()
        q = torch.randint(0, 16, (n, kk), generator=gen, device=dev, dtype=torch.int64)
        shifts = (torch.arange(kk, device=dev) % 8 * 4)
        words = (q << shifts).reshape(n, kk // 8, 8).sum(-1)  # 8 nibbles per word, element j at 4j
        wq = words.to(torch.int64).cpu().numpy().astype(np.uint32)
        scale = (torch.rand((n, kk // 32), generator=gen, device=dev) * 0.01 + 0.001).half()
        w_deq = ((q.float() - 7.0) * scale.float().repeat_interleave(32, dim=1)).half()
        args = [x, ("np", wq), scale]
        ref = x.float() @ w_deq.float().T
        if kern.bias:
            bias = (torch.randn(shapes[3], generator=gen, device=dev) * 0.1).half()
            args.append(bias)
            ref = ref + bias.float()

        def cublas():
            return F.linear(x, w_deq, args[3] if kern.bias else None)

    elif kern.kind == "layer_norm":
        x = torch.randn(shapes[0], generator=gen, device=dev).half()
        g = (1 + 0.1 * torch.randn(shapes[1], generator=gen, device=dev)).half()
        b = (0.1 * torch.randn(shapes[2], generator=gen, device=dev)).half()
        args = [x, g, b]
        ref = F.layer_norm(x.float(), (kern.n,), g.float(), b.float(), eps=1e-5)

        def cublas():
            return F.layer_norm(x, (kern.n,), g, b, eps=1e-5)

    else:
        raise ValueError(kern.kind)
    out = torch.empty(shapes[-1], dtype=torch.float16, device=dev)
    ref = ref.reshape(shapes[-1])
    nbytes = sum(a[1].nbytes if isinstance(a, tuple) else a.numel() * a.element_size()
                 for a in args) + out.numel() * out.element_size()
    return args, out, ref, cublas, nbytes


def _to_tvm(a, tvm_ffi, tvm, dev):
    if isinstance(a, tuple):  # numpy data (uint32 words: no torch dtype round trip)
        return tvm.runtime.tensor(a[1], dev)
    return tvm_ffi.from_dlpack(a)


def _sync(torch):
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time_torch(fn, torch, iters=100, reps=5):
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3 * 1e6
    for _ in range(10):
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


def _time_graph(fn, torch, per_graph=20, reps=5):
    if DEVICE != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(5):
                graph.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3 / (5 * per_graph))
        return statistics.median(times)
    except Exception:  # noqa: BLE001
        return None


def measure_kernel(name: str, entry: dict, *, torch, tvm, tvm_ffi, deadline: float, log) -> dict:
    kern = kernels_by_name()[name]
    func = kern.static()
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    args, out, ref, cublas, nbytes = _inputs(kern, func, torch, gen, dev=DEVICE)
    dev = tvm.device(DEVICE, 0)
    targs = [_to_tvm(a, tvm_ffi, tvm, dev) for a in args]
    tout = tvm_ffi.from_dlpack(out)
    scale = float(ref.abs().max())

    def run_and_check(so):
        mod = tvm.runtime.load_module(so)
        out.fill_(float("nan"))
        mod["main"](*targs, tout)
        _sync(torch)
        err = float((out.float() - ref).abs().max())
        if math.isnan(err):
            err = float("inf")
        return mod, err

    best_so_far = [float("inf")]

    def time_mod(mod):
        """Median of repeats; ~2 ms of back-to-back launches per repeat, fewer for candidates
        far slower than the best so far (their exact time does not matter)."""
        est = mod.time_evaluator("main", dev, number=1, repeat=3)(*targs, tout).results
        t = max(min(est), 1e-7)
        if t > 4 * best_so_far[0]:
            us = statistics.median(est) * 1e6
        else:
            number = max(1, min(200, int(2e-3 / t)))
            res = mod.time_evaluator("main", dev, number=number, repeat=9)(*targs, tout)
            us = statistics.median(res.results) * 1e6
        best_so_far[0] = min(best_so_far[0], us * 1e-6)
        return us

    result = {"name": name, "kind": kern.kind, "rows": kern.rows, "n": kern.n, "k": kern.k,
              "epilogue": kern.epilogue, "bytes": nbytes, "ref_max_abs": scale}
    # torch / cuBLAS
    y = cublas()
    _sync(torch)
    result["torch_err"] = float((y.float().reshape(ref.shape) - ref).abs().max())
    result["torch_us"] = _time_torch(cublas, torch)
    result["torch_graph_us"] = _time_graph(cublas, torch)
    # baselines
    base = {}
    for b in entry["baselines"]:
        rec = {k: v for k, v in b.items() if k != "so"}
        if "so" in b:
            try:
                mod, err = run_and_check(b["so"])
                rec["err"] = err
                rec["us"] = time_mod(mod)
            except Exception as e:  # noqa: BLE001
                rec["error"] = _last(e)
        base[b["label"]] = rec
    result["baselines"] = base
    errs = [r["err"] for r in base.values() if "err" in r and math.isfinite(r["err"])]
    tol = max(2 * max(errs) if errs else 0.0, 0.02 * scale, 2 * result["torch_err"])
    result["tolerance"] = tol
    untuned = [r["us"] for k, r in base.items() if k.startswith("dlight") and "us" in r
               and r.get("err", float("inf")) <= tol]
    result["untuned_us"] = min(untuned) if untuned else None
    # candidates
    cands = []
    wrong = 0
    for c in entry["candidates"]:
        if time.time() > deadline:
            result["truncated"] = True
            break
        rec = {"label": c["label"], "space": c["space"], "decisions": c["decisions"]}
        try:
            mod, err = run_and_check(c["so"])
            rec["err"] = err
            if err > tol:
                wrong += 1
                rec["wrong"] = True
            else:
                rec["us"] = time_mod(mod)
        except Exception as e:  # noqa: BLE001
            rec["error"] = _last(e)
        rec["_trace"] = c["trace"]
        cands.append(rec)
    timed = [c for c in cands if "us" in c]
    result["n_candidates"] = len(cands)
    result["n_wrong"] = wrong
    result["n_failed"] = sum(1 for c in cands if "error" in c)
    per_space = {}
    for c in timed:
        if c["space"] not in per_space or c["us"] < per_space[c["space"]]["us"]:
            per_space[c["space"]] = {"us": c["us"], "decisions": c["decisions"]}
    result["best_per_space"] = per_space
    if timed:
        best = min(timed, key=lambda c: c["us"])
        result["best"] = {k: v for k, v in best.items() if k != "_trace"}
        result["best_trace"] = best["_trace"]
        result["best_us"] = best["us"]
        if result["untuned_us"]:
            result["speedup_vs_untuned"] = result["untuned_us"] / best["us"]
        result["vs_torch"] = best["us"] / result["torch_us"]
        result["best_gbps"] = nbytes / (best["us"] * 1e-6) / 1e9
    result["candidates"] = [{k: v for k, v in c.items() if k != "_trace"} for c in cands]
    log(f"{name}: untuned {result['untuned_us']} us, best {result.get('best_us')} us "
        f"({result.get('best', {}).get('space')}), torch {result['torch_us']:.2f} us, "
        f"{len(timed)} timed, {wrong} wrong, {result['n_failed']} failed")
    return result


def measure_main(manifest_path: str, names: list[str], partial: str, progress: str, deadline: float):
    import torch
    import tvm
    import tvm_ffi

    with open(manifest_path) as f:
        manifest = json.load(f)
    counts = _install_cubin_cache(os.path.dirname(manifest_path)) if DEVICE == "cuda" else {}
    results = {}
    if os.path.exists(partial):
        with open(partial) as f:
            results = json.load(f)
    for name in names:
        if name in results:
            continue
        if time.time() > deadline:
            print(f"deadline reached; skipping {name}", flush=True)
            continue
        with open(progress, "w") as f:
            f.write(name)
        try:
            results[name] = measure_kernel(name, manifest[name], torch=torch, tvm=tvm, tvm_ffi=tvm_ffi,
                                           deadline=deadline, log=lambda s: print(s, flush=True))
        except Exception as err:  # noqa: BLE001 - record and go on (a sticky CUDA error ends the child)
            traceback.print_exc()
            results[name] = {"name": name, "error": _last(err)}
        tmp = partial + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, partial)
        print(f"cubin cache: {counts}", flush=True)
    with open(progress, "w") as f:
        f.write("")


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def gpu_info() -> dict:
    info = {}
    try:
        q = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,clocks_throttle_reasons.active"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        info["nvidia_smi"] = dict(zip(q.split(","), [s.strip() for s in out.split(",")]))
    except Exception as err:  # noqa: BLE001
        info["nvidia_smi_error"] = str(err)
    return info


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def table(results: dict) -> str:
    rows = []
    header = ("kernel", "dlight static", "dlight sym", "LowBatchGEMV", "best space", "best us",
              "x untuned", "torch us", "torch graph", "best/torch", "GB/s", "ok/wrong/fail")
    for name, r in results.items():
        if "error" in r and "baselines" not in r:
            rows.append((name, "ERROR " + r["error"][:60]) + ("",) * (len(header) - 2))
            continue
        b = r.get("baselines", {})
        rows.append((
            name,
            _fmt(b.get("dlight_static", {}).get("us")) + f" ({b.get('dlight_static', {}).get('rule', '?')})",
            _fmt(b.get("dlight_symbolic", {}).get("us")) + f" ({b.get('dlight_symbolic', {}).get('rule', '?')})",
            _fmt(b.get("lowbatchgemv_symbolic", {}).get("us")),
            r.get("best", {}).get("space", "-"),
            _fmt(r.get("best_us")),
            _fmt(r.get("speedup_vs_untuned")),
            _fmt(r.get("torch_us")),
            _fmt(r.get("torch_graph_us")),
            _fmt(r.get("vs_torch")),
            _fmt(r.get("best_gbps"), 0),
            f"{r.get('n_candidates', 0) - r.get('n_wrong', 0) - r.get('n_failed', 0)}/{r.get('n_wrong', 0)}/{r.get('n_failed', 0)}",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for spaces_check.json / .txt")
    ap.add_argument("--samples", type=int, default=48, help="random draws per kernel")
    ap.add_argument("--generic-samples", type=int, default=16,
                    help="random draws per matmul kernel from MetaSchedule's generic spaces")
    ap.add_argument("--only", default=None, help="regex of kernel names")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the run")
    ap.add_argument("--build-only", action="store_true", help="stop after the builds (no GPU)")
    ap.add_argument("--selftest-cpu", action="store_true",
                    help="exercise the script without a GPU: unscheduled llvm builds, torch on CPU")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child: manifest path
    ap.add_argument("--names", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.selftest_cpu:
        os.environ["SPACES_CHECK_DEVICE"] = "cpu"  # inherited by the measuring child
        global DEVICE  # noqa: PLW0603
        DEVICE = "cpu"
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, "spaces_check_partial.json")
    progress = os.path.join(tempfile.gettempdir(), "spaces_check_progress.txt")

    if args.measure:  # child
        measure_main(args.measure, args.names.split(","), partial, progress, args.deadline)
        return 0

    start = time.time()
    deadline = start + args.budget_s
    log_path = os.path.join(args.out, "spaces_check.log")
    log_file = open(log_path, "a")  # noqa: SIM115

    def log(msg):
        line = f"[{time.time() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    names = [k.name for k in kernel_list() if not args.only or re.search(args.only, k.name)]
    if not names:
        ap.error("no kernel matches --only")
    log(f"{len(names)} kernels, {args.samples} samples each, {args.workers} build workers")
    folder = tempfile.mkdtemp(prefix="spaces_check_")
    manifest = build_all(names, samples=args.samples, generic_samples=args.generic_samples,
                         workers=args.workers, folder=folder,
                         deadline=start + 0.55 * args.budget_s, log=log)
    manifest_path = os.path.join(folder, "manifest.json")
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    if args.build_only:
        for n in names:
            st = manifest[n]["stats"]
            log(f"{n}: {len(manifest[n]['candidates'])} candidates, baselines "
                f"{[b.get('rule') or b.get('error') for b in manifest[n]['baselines']]}, stats {st[:1]}")
        return 0

    crashed = []
    remaining = list(names)
    while remaining and time.time() < deadline:
        cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--measure", manifest_path,
               "--names", ",".join(remaining), "--deadline", str(deadline)]
        try:
            rc = subprocess.run(cmd, check=False, timeout=max(30.0, deadline - time.time() + 30)).returncode
        except subprocess.TimeoutExpired:
            rc = -9
        done = {}
        if os.path.exists(partial):
            with open(partial) as f:
                done = json.load(f)
        remaining = [n for n in remaining if n not in done]
        if rc != 0 and remaining:
            with open(progress) as f:
                bad = f.read().strip()
            log(f"measuring child died (rc {rc}) during {bad!r}; skipping it")
            crashed.append(bad)
            remaining = [n for n in remaining if n != bad]
        elif rc == 0:
            break
    results = {}
    if os.path.exists(partial):
        with open(partial) as f:
            results = json.load(f)
    for bad in crashed:
        results[bad] = {"name": bad, "error": "CUDA context lost while measuring this kernel"}
    ordered = {n: results[n] for n in names if n in results}
    try:
        import torch

        dev_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        dev_name = None
    import tvm

    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": dev_name, "tvm": tvm.__version__,
              "samples": args.samples, **gpu_info(), "stats": {n: manifest[n]["stats"] for n in names},
              "kernels": ordered}
    with open(os.path.join(args.out, "spaces_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = table(ordered)
    with open(os.path.join(args.out, "spaces_check.txt"), "w") as f:
        f.write(f"{dev_name}  {report['date']}  tvm {tvm.__version__}\n{text}\n")
    print(text)
    log(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
