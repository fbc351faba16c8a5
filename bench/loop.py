"""The timing loop shared by ``bench decode`` and ``bench prefill``: rows, runners, measurement.

Variants run one after the other, each loaded once for all test points and released before the
next loads (device memory), so tuned, untuned and the peers are measured in the same process on
the same device minutes apart. A variant that cannot run, or a point that fails, becomes an
``error`` row, never a crash.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from .checks import check_prompt, check_variant, first_line, open_tvm_variant, release
from .config import TORCH_VARIANTS
from .peers import torch_available
from .step_kernels import graph_kernels
from .timing import stats

logger = logging.getLogger(__name__)

__all__ = ["make_row", "error_row", "measure_decode", "measure_prefill", "open_runner", "drive",
           "untuned_shapes", "cpu_torch_threads"]


def make_row(s, *, variant: str, phase: str, batch: int, prompt_len: int | None, gen_len: int | None,
             seq_len: int | None, **fields) -> dict[str, Any]:
    """A decode/prefill row with every schema key (unset figures ``None``)."""
    from .report import test_label

    row = {
        "model": s.model_label, "quantization": s.quantization, "device": s.device.name, "arch": s.arch,
        "variant": variant,
        "test": test_label(phase=phase, batch=batch, prompt_len=prompt_len, gen_len=gen_len, seq_len=seq_len),
        "phase": phase, "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "seq_len": seq_len,
        "status": "ok", "error": None,
        "tok_s": None, "ms": None, "gpu_ms": None, "graph_ms": None, "kernels_ms": None, "overhead_ms": None,
        "gb_s": None, "pct_bw": None, "tflops": None, "pct_peak": None, "bytes_per_step": None, "flops": None,
        "speedup_vs_untuned": None, "tuned_kernels": None, "anatomy": None,
        "samples": {"wall_ms": [], "gpu_ms": None, "tok_s": []},
        "build": None, "notes": [],
    }
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}")
    row.update(fields)
    return row


def error_row(s, *, status: str = "error", error: str, **kw) -> dict[str, Any]:
    """A row for a point that could not be measured (``status`` error or skipped)."""
    return make_row(s, status=status, error=error, **kw)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def measure_decode(runner, *, timer, batch: int, prompt_len: int, gen_len: int, repeats: int,
                   warmup: int, profile_graph: bool = False) -> dict[str, Any]:
    """Time ``gen_len`` decode steps of ``batch`` sequences after a ``prompt_len`` prefill.

    One *run* = ``runner.start`` (prefill, untimed) + ``gen_len`` steps issued back to back and
    timed as one pass (:meth:`bench.timing.Timer.steps`: wall time of the run, GPU time of each
    step from events in the same pass) + ``runner.stop``. ``warmup`` runs are discarded.

    Returns
    -------
    dict
        ``tok_s`` / ``ms`` / ``gpu_ms`` statistics over runs (per-run tokens/s, wall ms/step and
        GPU ms/step; per run GPU <= wall by construction) and raw ``samples``.
    """
    run_ms, run_gpu, run_tok, gpu_steps = [], [], [], []
    graph_ms = in_graph = None
    for r in range(warmup + repeats):
        runner.start(batch=batch, prompt_len=prompt_len, gen_len=gen_len)
        try:
            t = timer.steps(runner.step, gen_len, stream=getattr(runner, "stream", None))
            if r == warmup + repeats - 1:
                graph_ms = _replay_ms(runner)
                in_graph = graph_kernels(runner) if profile_graph and graph_ms is not None else None
        finally:
            runner.stop()
        if r < warmup:
            continue
        run_ms.append(t.wall_ms / gen_len)
        run_tok.append(batch * gen_len / (t.wall_ms / 1e3))
        if t.gpu_ms is not None:
            gpu_steps.extend(t.gpu_ms)
            run_gpu.append(float(np.sum(t.gpu_ms)) / gen_len)
    return {"tok_s": stats(run_tok), "ms": stats(run_ms), "gpu_ms": stats(run_gpu) if run_gpu else None,
            "graph_ms": graph_ms, "graph_kernels": in_graph,
            "samples": {"wall_ms": run_ms, "gpu_ms": gpu_steps or None, "tok_s": run_tok}}


def _replay_ms(runner) -> float | None:
    """The runner's last step replayed alone as its CUDA graph (engines with whole-step graphs), in
    ms; None when there is none. A failure is logged and gives None: it never costs the row."""
    fn = getattr(runner, "replay_ms", None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a diagnostic, not the measurement
        logger.warning("graph replay timing failed: %s", first_line(e))
        return None


def measure_prefill(runner, *, timer, batch: int, seq_len: int, repeats: int, warmup: int,
                    profile_graph: bool = False) -> dict[str, Any]:
    """Time the prefill of ``batch`` fresh sequences of ``seq_len`` tokens.

    Each sample: ``runner.prepare`` (untimed) + ``runner.run`` timed in one pass (wall and, on
    CUDA with torch, GPU time from events around it) + ``runner.cleanup``.

    Returns
    -------
    dict
        Like :func:`measure_decode`; ``ms`` is per prefill of the whole batch.
    """
    wall, gpu = [], []
    graph_ms = in_graph = None
    for r in range(warmup + repeats):
        runner.prepare(batch=batch, seq_len=seq_len)
        try:
            t = timer.call(runner.run, stream=getattr(runner, "stream", None))
            if r == warmup + repeats - 1 and batch == 1:
                graph_ms = _replay_ms(runner)  # one chunk's graph: the whole prefill when it is one chunk
                in_graph = graph_kernels(runner) if profile_graph and graph_ms is not None else None
        finally:
            runner.cleanup()
        if r >= warmup:
            wall.append(t.wall_ms)
            if t.gpu_ms is not None:
                gpu.append(t.gpu_ms[0])
    tok = [batch * seq_len / (w / 1e3) for w in wall]
    return {"tok_s": stats(tok), "ms": stats(wall), "gpu_ms": stats(gpu) if gpu else None, "graph_ms": graph_ms,
            "graph_kernels": in_graph, "samples": {"wall_ms": wall, "gpu_ms": gpu or None, "tok_s": tok}}


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------
def cpu_torch_threads(requested: int | None) -> int:
    """Intra-op threads for the PyTorch peers on the CPU: ``requested``, else TVM's thread-pool
    size, so both sides use the same cores (torch's default, every logical core, oversubscribes a
    loaded machine: one thread was measured 35x faster than the default on a busy 2-core box)."""
    if requested:
        return int(requested)
    try:
        import tvm

        n = int(tvm.get_global_func("runtime.NumThreads")())
    except Exception:  # noqa: BLE001 - TVM without that registry entry: one thread
        n = 1
    return max(1, n)


def _peer_weight_bytes(params: dict[str, np.ndarray], dtype: str) -> int:
    """Bytes of weights a forward step reads (every parameter once, ``wpe`` excluded)."""
    size = np.dtype(dtype).itemsize
    return int(sum(v.size * size for k, v in params.items() if not k.endswith("wpe.weight")))


def _torch_runner(s, variant: str, *, phase: str, cuda_graph: bool, check: bool):
    if s.device.kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("this torch build has no CUDA")
    info: dict[str, Any] = {}
    if s.device.kind == "cpu":
        import torch

        n = cpu_torch_threads(s.cfg.torch_threads)
        torch.set_num_threads(n)
        info["torch_threads"] = n
    if variant == "torch-compile":  # the gpt-fast-style peer (bench/gptfast.py)
        from . import gptfast

        cls = gptfast.GptFastDecodeRunner if phase == "decode" else gptfast.GptFastPrefillRunner
        params = s.peer_params()
        runner = cls(s.config, params, dtype=s.dtype, device=s.device.name, compiled=True, seed=s.seed)
        if not hasattr(runner, "weight_bytes"):
            runner.weight_bytes = _peer_weight_bytes(params, s.dtype)
        if not hasattr(runner, "kv_bytes_per_token"):
            runner.kv_bytes_per_token = 2 * s.config.n_layer * s.config.n_embd * np.dtype(s.dtype).itemsize
        info.update(peer="gpt-fast-style (bench/gptfast.py)", torch_compile_mode="reduce-overhead, fullgraph")
        if check:
            logits = np.asarray(runner.logits(check_prompt(s)[None, :]), np.float32)[0]
            info["check"] = check_variant(s, variant, logits)
        return runner, info
    from .peers import TorchDecodeRunner, TorchPrefillRunner, build_hf_model, compile_mode

    model = build_hf_model(s.config, params=s.peer_params(), dtype=s.dtype, device=s.device.name)
    cls = TorchDecodeRunner if phase == "decode" else TorchPrefillRunner
    compiled = variant == "hf-compile"
    runner = cls(model, device=s.device.name, compiled=compiled, seed=s.seed, cuda_graph=cuda_graph)
    info.update(peer="Hugging Face GPT2LMHeadModel",
                torch_compile_mode=(compile_mode(device=s.device.name, cuda_graph=cuda_graph) or "default")
                if compiled else None,
                attn_implementation=getattr(model.config, "_attn_implementation", None))
    return runner, info


def open_runner(s, variant: str, *, phase: str, cuda_graph: bool, cache_dir, max_batch: int,
                max_tokens: int, check: bool, state: dict, log) -> tuple[Any, dict[str, Any] | None]:
    """Runner (decode or prefill) of one variant plus its build record.

    ``state`` carries the untuned check logits to the tuned variant when there is no torch
    reference. Raises when the variant cannot run here (or fails its logits check).
    """
    if variant in TORCH_VARIANTS:
        return _torch_runner(s, variant, phase=phase, cuda_graph=cuda_graph, check=check)
    from .runners import TvmDecodeRunner, TvmPrefillRunner

    engine, info, logits = open_tvm_variant(s, variant, cuda_graph=cuda_graph, cache_dir=cache_dir,
                                            max_batch=max_batch, max_tokens=max_tokens, check=check,
                                            untuned_logits=state.get("untuned_logits"), log=log)
    if variant == "untuned":
        state["untuned_logits"] = logits
    if phase == "decode":
        runner = TvmDecodeRunner(engine, variant=variant, seed=s.seed)
        info["decode_path"] = runner.path  # token-steps (device-resident ids) or embed+decode (older library)
        return runner, info
    return TvmPrefillRunner(engine, variant=variant, seed=s.seed), info


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def untuned_shapes(s, p: dict, buckets: dict) -> str | None:
    """Which shapes of a test point have no tuned bucket entry point (None when all do)."""
    if p["phase"] == "decode":
        return None if p["batch"] in buckets.get("decode", []) else f"decode batch {p['batch']}"
    missing = sorted(x for x in chunk_lengths(s.config, p["seq_len"]) if x not in buckets.get("prefill", []))
    return f"prefill chunk length(s) {missing}" if missing else None


def chunk_lengths(config, seq_len: int) -> set[int]:
    """The distinct chunk lengths a prefill of ``seq_len`` tokens runs."""
    chunk = config.prefill_chunk_size
    lengths = {chunk} if seq_len >= chunk else set()
    if seq_len % chunk:
        lengths.add(seq_len % chunk)
    return lengths


def _tuned_note(s, p: dict, info: dict, anatomy: dict | None) -> tuple[dict | None, str | None]:
    """``tuned_kernels`` field and the row note of a tuned row: n of m kernels tuned, share of step."""
    if anatomy is not None and anatomy.get("tuned") is not None:
        tk = {"tuned": anatomy["tuned"], "total": anatomy["kernels"], "share": anatomy["tuned_share"],
              "basis": f"measured kernel time ({anatomy['method']})"}
    else:
        per = info.get("coverage_buckets") or {}
        if p["phase"] == "decode":
            keys = [f"decode b{p['batch']}"]
        else:
            keys = [f"prefill s{n}" for n in sorted(chunk_lengths(s.config, p["seq_len"]))]
        found = [per[k] for k in keys if k in per]
        if per and len(found) == len(keys):
            tuned, total = sum(f[0] for f in found), sum(f[1] for f in found)
            share = float(np.mean([f[2] for f in found]))
            tk = {"tuned": tuned, "total": total, "share": share, "basis": "estimated cost (bytes/FLOPs)"}
        else:
            tk = None
    miss = untuned_shapes(s, p, info.get("buckets") or {})
    if tk is None:
        if not miss:
            return None, None
        return None, (f"{miss} not among the database's buckets {info.get('buckets')}: the tuned build runs "
                      "the untuned (symbolic-shape) kernels there")
    note = (f"tuned kernels: {tk['tuned']} of {tk['total']} ({100 * tk['share']:.0f}% of the step's kernel time, "
            f"{tk['basis']})")
    if miss:
        note += f"; {miss} not among the database's buckets {info.get('buckets')}"
    return tk, note


def _run_variant(s, variant: str, *, points: list[dict], measure, figures, opts: dict, anatomy, state: dict,
                 log) -> list[dict[str, Any]]:
    if variant in TORCH_VARIANTS and not torch_available():
        return [error_row(s, status="skipped", error="torch/transformers not importable", variant=variant, **p)
                for p in points]
    try:
        runner, info = open_runner(s, variant, phase=points[0]["phase"], state=state, log=log, **opts)
    except Exception as e:  # noqa: BLE001 - a variant that cannot run is a row, not a crash
        log(f"{variant}: cannot run: {first_line(e)}")
        return [error_row(s, error=first_line(e), variant=variant, **p) for p in points]
    rows: list[dict[str, Any]] = []
    for p in points:
        label = make_row(s, variant=variant, **p)["test"]
        try:
            m = measure(runner, p)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on its first call
            log(f"{variant} {label}: failed: {first_line(e)}")
            rows.append(error_row(s, error=first_line(e), build=info, variant=variant, **p))
            continue
        fig = figures(runner, p, m)
        notes = fig.pop("notes", [])
        extra: dict[str, Any] = {}
        an = anatomy(variant, p, m, notes) if anatomy is not None else None
        gk = m.get("graph_kernels")
        if gk is not None:  # (--graph-kernels, with or without the kernels-alone anatomy)
            an = an if an is not None else {}
            an["graph_kernels"] = gk
            notes.append(f"in the step's graph: {gk['ms']:.3f} ms of kernels ({gk['launches']:.0f} launches; the KV "
                         f"cache's {gk['kv_ms']:.3f} ms); wall / in-graph kernels = {m['ms'].median / gk['ms']:.2f}x")
        if an is not None:
            extra.update(anatomy=an, kernels_ms=an.get("kernels_ms"), overhead_ms=an.get("overhead_ms"))
        if m.get("graph_ms") is not None:
            extra["graph_ms"] = m["graph_ms"]
            notes.append(f"whole-step CUDA graph replayed alone: {m['graph_ms']:.3f} ms of GPU time per "
                         f"{'step' if p['phase'] == 'decode' else 'chunk'}; wall - graph = "
                         f"{m['ms'].median - m['graph_ms']:.3f} ms (host work the GPU waited for, launch gaps)")
        if variant == "tuned" and info is not None:
            tk, note = _tuned_note(s, p, info, an)
            extra["tuned_kernels"] = tk
            if note:
                notes.append(note)
        if info is not None and info.get("torch_threads"):
            notes.append(f"PyTorch on the CPU with {info['torch_threads']} thread(s) (TVM's thread-pool size; "
                         "--torch-threads to change)")
        rows.append(make_row(s, variant=variant, **p, tok_s=m["tok_s"].to_dict(), ms=m["ms"].to_dict(),
                             gpu_ms=m["gpu_ms"].to_dict() if m["gpu_ms"] else None, samples=m["samples"],
                             build=info, notes=notes, **fig, **extra))
        log(f"{variant:>13} {label:>11}" + (f" p{p['prompt_len']}" if p.get("prompt_len") else "")
            + f": {m['tok_s'].median:12.1f} tok/s  {m['ms'].median:9.3f} ms"
            + (f"  gpu {m['gpu_ms'].median:.3f} ms" if m["gpu_ms"] else "")
            + (f"  kernels {extra['kernels_ms']:.3f} ms" if extra.get("kernels_ms") is not None else "")
            + (f"  graph {extra['graph_ms']:.3f} ms" if extra.get("graph_ms") is not None else "")
            + (f"  in-graph kernels {an['graph_kernels']['ms']:.3f} ms" if an and an.get("graph_kernels") else ""))
    return rows


def drive(s, *, points: list[dict], measure: Callable, figures: Callable, opts: dict, anatomy=None,
          log) -> list[dict[str, Any]]:
    """Run every variant over every point; one row per (variant, point), failures included.

    ``anatomy(variant, point, measurement, notes)`` (optional) returns the step anatomy of a
    row (see :mod:`bench.anatomy`).
    """
    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {}
    for v in s.variants:
        rows += _run_variant(s, v, points=points, measure=measure, figures=figures, opts=opts, anatomy=anatomy,
                             state=state, log=log)
        release(None)  # the variant's runner went out of scope with _run_variant: free device memory now
    return rows
