#!/usr/bin/env python
"""Where a step's GPU time goes: every CUDA kernel of a prefill / decode step, KV-cache kernels included.

``bench kernels`` times the partitioned kernels one by one; this script profiles whole steps of the
engine with ``torch.profiler`` (CUPTI sees every kernel launched in the process, TVM's included)
and prints, per scenario and variant: wall ms per step, the summed kernel time per step, the idle
gap (wall - kernels: host work and launch latency) and the top kernels with calls and µs per step.

Usage (GPU machine, repo root on PYTHONPATH)::

    python scripts/step_profile.py --out $OUT [--variants untuned,tuned] [--database DIR]
        [--prefill 128,1024] [--decode 1,8] [--steps 20]

Writes ``profile.json`` and ``profile.txt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


def _kernel_table(prof, steps: int) -> list[dict]:
    rows: dict[str, dict] = defaultdict(lambda: {"calls": 0, "us": 0.0})
    for evt in prof.events():
        if str(getattr(evt, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        r = rows[evt.name]
        r["calls"] += 1
        dur = getattr(evt, "device_time", None)
        if dur is None:
            dur = getattr(evt, "cuda_time", 0.0)
        r["us"] += float(dur)
    out = [{"kernel": k, "calls_per_step": v["calls"] / steps, "us_per_step": v["us"] / steps}
           for k, v in rows.items()]
    out.sort(key=lambda r: -r["us_per_step"])
    return out


def _profile(fn, *, steps: int, sync) -> tuple[float, list[dict]]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    return wall, _kernel_table(prof, steps)


class _HostClock:
    """Host time inside named engine calls (perf_counter around each), for ``--host``."""

    def __init__(self):
        self.us: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, name: str, label: str | None = None) -> None:
        fn = getattr(obj, name)
        label = label or name

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.us[label] += (time.perf_counter() - t0) * 1e6
                self.calls[label] += 1

        setattr(obj, name, timed)


def _host_phases(engine, fn, *, steps: int, sync) -> dict:
    """Wall per call of ``fn`` (synchronised) and the host µs per call spent in each engine phase."""
    clock = _HostClock()
    for name in ("begin_forward", "end_forward", "synchronize", "add_sequence", "remove_sequence", "_check_prompt",
                 "_flush_aux", "_pages"):
        if hasattr(engine, name):
            clock.wrap(engine, name)
    if getattr(engine, "graphs", None) is not None:
        for name in ("run", "load_prompt", "load_ids"):
            clock.wrap(engine.graphs, name, f"graphs.{name}")
    for _ in range(3):
        fn()
    sync()
    clock.us.clear()
    clock.calls.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    wall_us = (time.perf_counter() - t0) * 1e6 / steps
    phases = {k: {"us_per_step": v / steps, "calls_per_step": clock.calls[k] / steps} for k, v in clock.us.items()}
    return {"wall_us": wall_us, "phases": dict(sorted(phases.items(), key=lambda kv: -kv[1]["us_per_step"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--quantization", default="q0f16")
    ap.add_argument("--variants", default="untuned,tuned")
    ap.add_argument("--database", default=None)
    ap.add_argument("--prefill", default="128,1024", help="prefill lengths to profile ('' for none)")
    ap.add_argument("--decode", default="1,8", help="decode batches to profile ('' for none)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--host", action="store_true",
                    help="instead of kernels: host µs per step in each engine phase, CUDA graphs on")
    ap.add_argument("--hidden-host", action="store_true",
                    help="instead of kernels: each step's GPU time with its host work hidden behind a GPU sleep "
                         "queued first, vs the synchronised wall and the graph replayed alone (CUDA graphs on)")
    args = ap.parse_args(argv)

    from bench.config import BenchConfig
    from bench.setup import setup

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = setup(BenchConfig(model=args.model, quantization=args.quantization, variants=args.variants,
                          database=args.database))
    pre = [int(x) for x in args.prefill.split(",") if x]
    dec = [int(x) for x in args.decode.split(",") if x]
    lines: list[str] = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    if args.host:
        return _main_host(args, s, pre, dec, out, emit, lines)
    if args.hidden_host:
        return _main_hidden(args, s, pre, dec, out, emit, lines)

    def kernels(engine, fn, sync):
        wall, table = _profile(fn, steps=args.steps, sync=sync)
        return {"wall_ms": wall, "kernels": table}

    results = _scenarios(s, args, pre, dec, cuda_graph=False, measure=kernels)
    for res in results:
        ktot = sum(k["us_per_step"] for k in res["kernels"]) / 1e3
        calls = sum(k["calls_per_step"] for k in res["kernels"])
        res["kernel_ms"] = ktot
        emit(f"== {res['variant']} {res['scenario']}: wall {res['wall_ms']:.3f} ms/step, kernels {ktot:.3f} ms "
             f"({calls:.0f} launches), gap {res['wall_ms'] - ktot:.3f} ms")
        for k in res["kernels"][:args.top]:
            emit(f"   {k['us_per_step']:9.1f} us  {k['calls_per_step']:6.1f}x  {k['kernel'][:90]}")
    (out / "profile.json").write_text(json.dumps({"env": s.env, "results": results}, indent=1, default=str))
    (out / "profile.txt").write_text("\n".join(lines) + "\n")
    return 0


def _scenarios(s, args, pre, dec, *, cuda_graph: bool, measure, sync_prefill: bool = True) -> list[dict]:
    """Each variant's prefill (one fresh sequence per length) and decode (per batch) scenarios:
    ``measure(engine, fn, sync)`` on the step ``fn``, with the variant and scenario added (a
    prefill ``fn`` synchronises before removing its sequence unless ``sync_prefill`` is False)."""
    from bench.checks import open_tvm_variant, release
    from bench.runners import TvmDecodeRunner, TvmPrefillRunner

    results = []
    for variant in s.variants:
        engine, _, _ = open_tvm_variant(s, variant, cuda_graph=cuda_graph, cache_dir=None, max_batch=max(dec or [1]),
                                        max_tokens=max(dec or [1]) * (args.prompt_len + 4 * args.steps + 64) + 2048,
                                        check=False, untuned_logits=None, log=lambda m: print(m, file=sys.stderr))
        sync = engine.device.sync
        for n in pre:
            r = TvmPrefillRunner(engine, variant=variant)

            def once(r=r, n=n):
                r.prepare(batch=1, seq_len=n)
                try:
                    r.run()
                finally:
                    if sync_prefill:
                        sync()
                    r.cleanup()

            results.append(dict(measure(engine, once, sync), variant=variant, scenario=f"prefill {n}"))
        for b in dec:
            r = TvmDecodeRunner(engine, variant=variant)
            r.start(batch=b, prompt_len=args.prompt_len, gen_len=4 * args.steps + 40)
            try:
                results.append(dict(measure(engine, r.step, sync), variant=variant, scenario=f"decode b{b}"))
            finally:
                r.stop()
        release(engine)
    return results


def _main_host(args, s, pre, dec, out, emit, lines) -> int:
    """``--host``: where the host time of a graph-mode step goes (the GPU waits for it)."""

    def host(engine, fn, sync):
        res = _host_phases(engine, fn, steps=args.steps, sync=sync)
        graphs = getattr(engine, "graphs", None)
        return dict(res, graph_ms=graphs.replay_ms() if graphs else None)  # the step's graph alone

    results = _scenarios(s, args, pre, dec, cuda_graph=True, measure=host)
    for res in results:
        emit(f"== {res['variant']} {res['scenario']} (graphs on): wall {res['wall_us']:.1f} us/step, "
             f"graph alone {1e3 * (res['graph_ms'] or 0):.1f} us")
        for k, v in res["phases"].items():
            emit(f"   {v['us_per_step']:9.1f} us  {v['calls_per_step']:5.1f}x  {k}")
    (out / "host_profile.json").write_text(json.dumps({"env": s.env, "results": results}, indent=1, default=str))
    (out / "host_profile.txt").write_text("\n".join(lines) + "\n")
    return 0


def _main_hidden(args, s, pre, dec, out, emit, lines) -> int:
    """``--hidden-host``: is a graph-mode step's wall - graph gap host work or GPU work?

    Per step, three medians: ``wall`` (the step, then a synchronise: what bench measures); ``gpu
    hidden`` (a ~3 ms GPU sleep queued on the engine's stream first, an event after it and one after
    the step: the step's GPU time with every host part of it done while the GPU sleeps -- what
    remains over the graph is GPU-side: the KV cache's auxiliary copy, waits, clocks); ``graph`` (the
    step's graph replayed alone)."""
    import numpy as np
    import torch

    def hidden(engine, fn, sync):
        stream = torch.cuda.ExternalStream(engine.graphs.stream)
        walls, gpus = [], []
        for i in range(3 + args.steps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            wall = (time.perf_counter() - t0) * 1e3
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                torch.cuda._sleep(6_000_000)  # ~3 ms at ~2 GHz: longer than the step's host work
                a.record(stream)
            fn()
            b.record(stream)
            sync()
            if i >= 3:
                walls.append(wall)
                gpus.append(a.elapsed_time(b))
        return {"wall_ms": float(np.median(walls)), "gpu_hidden_ms": float(np.median(gpus)),
                "graph_ms": engine.graphs.replay_ms()}

    results = _scenarios(s, args, pre, dec, cuda_graph=True, measure=hidden, sync_prefill=False)
    for res in results:
        emit(f"== {res['variant']} {res['scenario']}: wall {res['wall_ms']:.3f} ms, GPU with the host hidden "
             f"{res['gpu_hidden_ms']:.3f} ms, graph alone {res['graph_ms'] or 0:.3f} ms")
    (out / "hidden_host.json").write_text(json.dumps({"env": s.env, "results": results}, indent=1, default=str))
    (out / "hidden_host.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
