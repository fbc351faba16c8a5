"""Diagnosis of the gpt-fast-style peer (bench/gptfast.py): timings per option, recompiles, skips.

For each option set ("variant") it times, in a fresh dynamo state (``torch._dynamo.reset()``):

* decode: ms/step at each batch (prompt 128, ``--steps`` steps after ``--warmup`` steps; wall
  time of the steps over perf_counter with a sync at both ends, and GPU time between CUDA events),
* prefill: ms per prefill of one sequence at each length (median of ``--repeats`` calls, wall
  and GPU), plus the CUDA kernels one compiled prefill launches (torch.profiler) and the host
  time of the call: prefill time flat in the length = launch overhead,

and reports the graphs dynamo compiled (expected: one per shape), recompile reasons, graph
breaks and inductor's cudagraph skips (counters and log records). A variant is started only
while the run is under ``--budget-s`` (compiles dominate: about 10-20 s a graph on the GPU box).

Variants (``--variants``, in this order by default):
  dec-default   decode, torch's own SDPA choice (the bench peer's default)
  pre-default   prefill, torch's own SDPA choice (the bench peer's default)
  dec-math      decode, the math backend only (gpt-fast's decode context)
  dec-nocudnn   decode, flash / memory-efficient / math (no cuDNN)
  pre-nocudnn   prefill, no cuDNN
  pre-graphs    prefill with CUDA graphs (reduce-overhead): how much of it is launch overhead
  dec-nocdt     decode without inductor's coordinate-descent tuning

GPU:  python scripts/peer_diag.py --out bench/results/peer_diag.json
CPU smoke run:  python scripts/peer_diag.py --device cpu --model tiny --out /tmp/peer_diag.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

#: name -> (phase, runner options)
VARIANTS = {
    "dec-default": ("decode", {}),
    "pre-default": ("prefill", {}),
    "dec-math": ("decode", {"decode_sdpa": "math"}),
    "dec-nocudnn": ("decode", {"decode_sdpa": "no-cudnn"}),
    "pre-nocudnn": ("prefill", {"prefill_sdpa": "no-cudnn"}),
    "pre-graphs": ("prefill", {"prefill_graphs": True}),
    "dec-nocdt": ("decode", {"coordinate_descent": False}),
}


class _Keep(logging.Handler):
    """Keeps torch's log records about recompiles, graph breaks and CUDA-graph skips."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        low = msg.lower()
        if any(w in low for w in ("cudagraph", "skipping", "recompil", "graph break", "guard failure", "fallback")):
            self.lines.append(f"{record.name}: {msg[:400]}")


class _Clock:
    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn, n: int) -> tuple[float, float | None]:
        """(wall ms, GPU ms) of ``n`` back-to-back calls of ``fn``, per call."""
        torch = self.torch
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        if self.cuda:
            start.record()
        for _ in range(n):
            fn()
        if self.cuda:
            end.record()
        self.sync()
        wall = (time.perf_counter() - t0) * 1e3 / n
        return wall, (start.elapsed_time(end) / n if self.cuda else None)


def _kernels_per_call(torch, fn) -> dict | None:
    """CUDA kernels (and memcpy/memset) one call of ``fn`` launches, and its host time (profiler)."""
    try:
        from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            host = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
        return {"gpu_events": len(kernels), "host_ms_profiled": round(host, 3),
                "gpu_busy_ms": round(sum(e.device_time for e in kernels) / 1e3, 3)}
    except Exception as e:  # noqa: BLE001 - a diagnostic
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def _sdpa_choice(torch, config, dtype, device, *, batch: int, q_len: int, kv_len: int) -> str:
    """Which fused backend torch's default selection takes for that masked attention."""
    try:
        from torch.nn.attention import SDPBackend  # pylint: disable=import-outside-toplevel

        q = torch.zeros(batch, config.n_head, q_len, config.head_dim, dtype=dtype, device=device)
        k = torch.zeros(batch, config.n_head, kv_len, config.head_dim, dtype=dtype, device=device)
        mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        return SDPBackend(torch._fused_sdp_choice(q, k, k, mask)).name  # pylint: disable=protected-access
    except Exception as e:  # noqa: BLE001 - a diagnostic
        return f"? ({type(e).__name__})"


def _counts(counters) -> dict:
    stats = counters["stats"]
    return {"graphs": int(stats.get("unique_graphs", 0)), "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
            "cudagraph_recorded_non_static_inputs": int(counters["inductor"].get("cudagraph_recorded_non_static_inputs", 0))}


def run_decode(runner, clock, *, batches, prompt_len: int, warmup: int, steps: int, log) -> dict:
    out = {}
    for b in batches:
        t0 = time.perf_counter()
        runner.start(batch=b, prompt_len=prompt_len, gen_len=warmup + 2 * steps)
        for _ in range(warmup):  # compile + CUDA-graph recording
            runner.step()
        clock.sync()
        first = (time.perf_counter() - t0) * 1e3
        wall, gpu = clock.time(runner.step, steps)
        runner.stop()
        # a second run of the same shape (as bench's repeats): must neither recompile nor re-record
        runner.start(batch=b, prompt_len=prompt_len, gen_len=warmup + 2 * steps)
        wall2, gpu2 = clock.time(runner.step, steps)
        runner.stop()
        out[f"b{b}"] = {"ms": round(wall, 4), "gpu_ms": None if gpu is None else round(gpu, 4),
                        "ms_second_run": round(wall2, 4), "warmup_s": round(first / 1e3, 1)}
        log(f"    b{b:<3} {wall:8.3f} ms/step (gpu {gpu if gpu is None else round(gpu, 3)}; second run "
            f"{wall2:.3f}; compile+warm-up {first / 1e3:.1f} s)")
    return out


def run_prefill(runner, clock, *, seqs, repeats: int, log) -> dict:
    torch = runner._torch  # pylint: disable=protected-access
    out = {}
    for n in seqs:
        t0 = time.perf_counter()
        for _ in range(3):  # compile + autotune
            runner.prepare(batch=1, seq_len=n)
            runner.run()
        clock.sync()
        first = (time.perf_counter() - t0) * 1e3
        walls, gpus = [], []
        for _ in range(repeats):
            runner.prepare(batch=1, seq_len=n)
            w, g = clock.time(runner.run, 1)
            walls.append(w)
            if g is not None:
                gpus.append(g)
        rec = {"ms": round(statistics.median(walls), 4), "gpu_ms": round(statistics.median(gpus), 4) if gpus else None,
               "warmup_s": round(first / 1e3, 1)}
        if clock.cuda:
            runner.prepare(batch=1, seq_len=n)
            rec["profile"] = _kernels_per_call(torch, runner.run)
        runner.cleanup()
        out[f"pp{n}"] = rec
        log(f"    pp{n:<5} {rec['ms']:8.3f} ms (gpu {rec['gpu_ms']}; compile+warm-up {first / 1e3:.1f} s)"
            + (f"  profile {rec['profile']}" if "profile" in rec else ""))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seqs", default="128,512,1024")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10, help="timed prefill calls per length")
    ap.add_argument("--budget-s", type=float, default=75.0, help="start no variant after this many seconds")
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="float16 on CUDA, float32 on the CPU by default")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    from bench.gptfast import GptFastDecodeRunner, GptFastPrefillRunner, _torch_dtype
    from bench.peers import random_params
    from gpt2_model.config import get_config

    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)  # a smoke run: torch's default oversubscribes a shared CPU
    dtype = args.dtype or ("float16" if cuda else "float32")
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}")
    batches = [int(x) for x in args.batches.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    torch._logging.set_logs(recompiles=True, graph_breaks=True, perf_hints=True)  # pylint: disable=protected-access
    keep = _Keep()
    logging.getLogger("torch").addHandler(keep)
    config = get_config(args.model)
    params = random_params(config, seed=0)
    clock = _Clock(torch, cuda)
    tdt = _torch_dtype(dtype)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype,
           "model": args.model,
           "default_sdpa_choice": {f"decode b{b}": _sdpa_choice(torch, config, tdt, args.device, batch=b, q_len=1,
                                                                 kv_len=args.prompt_len + args.warmup + 2 * args.steps)
                                   for b in batches}
           | {f"prefill {n}": _sdpa_choice(torch, config, tdt, args.device, batch=1, q_len=n, kv_len=n) for n in seqs}}
    log(f"env: {json.dumps(env)}")
    results: dict = {"env": env, "variants": {}, "skipped": []}
    for name in names:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            results["skipped"].append(name)
            log(f"{name}: skipped (budget: {elapsed:.0f} s > {args.budget_s:.0f} s)")
            continue
        phase, options = VARIANTS[name]
        torch._dynamo.reset()  # pylint: disable=protected-access
        counters.clear()
        first_log = len(keep.lines)
        log(f"{name}: {phase} {options or '(defaults)'}")
        t0 = time.perf_counter()
        if phase == "decode":
            runner = GptFastDecodeRunner(config, params, dtype=dtype, device=args.device, compiled=True,
                                         compile_prefill=False, **options)
            timings = run_decode(runner, clock, batches=batches, prompt_len=args.prompt_len, warmup=args.warmup,
                                 steps=args.steps, log=log)
            expected = len(batches)
        else:
            runner = GptFastPrefillRunner(config, params, dtype=dtype, device=args.device, compiled=True, **options)
            timings = run_prefill(runner, clock, seqs=seqs, repeats=args.repeats, log=log)
            expected = len(seqs)
        counts = _counts(counters)
        lines = keep.lines[first_log:]
        ok = counts["graphs"] == expected and not counts["graph_breaks"] and not counts["cudagraph_skips"]
        log(f"    graphs {counts['graphs']} (expected {expected}: one per shape), graph breaks "
            f"{counts['graph_breaks']}, cudagraph skips {counts['cudagraph_skips']}, log records {len(lines)}"
            f" -> {'OK' if ok else 'CHECK'}  ({time.perf_counter() - t0:.0f} s)")
        for line in lines[:12]:
            log(f"    LOG {line}")
        results["variants"][name] = {"phase": phase, "options": options, "timings": timings, "counts": counts,
                                     "expected_graphs": expected, "ok": ok, "log": lines}
        del runner
        out_path.write_text(json.dumps(results, indent=1))  # partial results survive a timeout
    log("summary (ms; decode per step, prefill per sequence):")
    for name, r in results["variants"].items():
        cells = "  ".join(f"{k} {v['ms']:.3f}" for k, v in r["timings"].items())
        log(f"  {name:<12} {cells}  graphs {r['counts']['graphs']}/{r['expected_graphs']}"
            f"{'' if r['ok'] else '  CHECK'}")
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    out_path.write_text(json.dumps(results, indent=1))
    log(f"total {results['total_s']} s -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
