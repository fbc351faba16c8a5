"""The decode attention search: TVM's ``batch_decode_paged_kv`` against :mod:`tuning.attention_decode`'s template.

Measured on the local GPU like the prefill search (:func:`tuning.attention.tune_attention`); the
winner, when a checked candidate beats TVM's kernel, becomes the ``batch_decode_paged_kv`` entry of
``attention.json``, which :func:`tuning.attention.apply_attention` applies at compile time.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .attention import (ATTENTION_FILE, MAX_REGRESSION, AttentionError, _build_all, _score, _write_entry,
                        attention_key)
from .attention_build import make_candidates
from .attention_decode import (DECODE_KERNEL, DECODE_LSE_ATOL, DECODE_OUT_RTOL, MIXED_CASE, DecodeConfig, DecodeError,
                               DecodeInputs, decode_candidates, decode_cases, make_decode_kernel, paged_decode_args)

logger = logging.getLogger(__name__)

__all__ = ["DECODE_CONTEXTS", "decode_errors", "measure_paged_decode", "tune_decode_attention"]

#: Context lengths (tokens per sequence) the decode search times at each decode batch.
DECODE_CONTEXTS = (256, 129)


def tune_decode_attention(config, *, dtype: str, target, out_dir: str | os.PathLike, batches: Sequence[int],
                          contexts: Sequence[int] = DECODE_CONTEXTS, device=None, candidates: Sequence | None = None,
                          workers: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Search the decode attention template against TVM's ``batch_decode_paged_kv`` on the local GPU.

    Every candidate (default :func:`tuning.attention_decode.decode_candidates`; TVM's kernel is always
    measured) is built in parallel, checked against the NumPy reference on NaN-poisoned paged inputs
    (every timed case and a mixed batch; ``DECODE_OUT_RTOL`` / ``DECODE_LSE_ATOL``) and timed at each
    batch x context (CUDA-graph replays where torch with CUDA is here, else ``time_evaluator``, 50 calls x
    5: :func:`measure_paged_decode`). Objective: the geometric mean over the cases
    of time / TVM's time, no case more than :data:`MAX_REGRESSION` slower.

    The best candidate is written to ``attention.json`` (``"kernel": "batch_decode_paged_kv"``,
    ``"template": "decode"``; other entries kept) only when it passed the check and beats TVM's
    kernel; otherwise the file is left as it was.

    Returns
    -------
    dict
        ``entry`` (the stored entry, or None), ``results`` (every candidate measured), ``default``.
    """
    import tvm  # pylint: disable=import-outside-toplevel

    device = device or tvm.cuda(0)
    if not device.exist:
        raise AttentionError("attention tuning measures on a local CUDA GPU, and this machine has none")
    key = attention_key(config, dtype)
    cands = [None] + [c for c in (candidates if candidates is not None else decode_candidates(key, target))
                      if c is not None]
    t0 = time.time()
    made = make_candidates(make_decode_kernel, [(c, key, target) for c in cands], expected=(DecodeError,),
                           workers=workers)
    kept, funcs = [cands[i] for i, _ in made], [f for _, f in made]
    batches = sorted({int(b) for b in batches})
    contexts = sorted({int(n) for n in contexts})
    timed = decode_cases(batches, contexts)
    cases = {**timed, **MIXED_CASE}
    log(f"attention: {len(kept) - 1} candidates of {DECODE_KERNEL} for {key.label()} and TVM's, timed at batches "
        f"{batches} x contexts {contexts}; building...")
    paths, errors = _build_all(funcs, target, workers=workers)
    log(f"attention: built {sum(p is not None for p in paths)}/{len(paths)} in {time.time() - t0:.0f} s; measuring")
    if errors:
        tail = [ln for ln in errors[0].splitlines() if ln.strip()][-3:]
        log(f"attention: {len(errors)} failed to build; first error: {' | '.join(tail)}")
    results, cache = [], {}
    for c, p in zip(kept, paths):
        if p is None:
            continue
        try:
            r = measure_paged_decode(tvm.runtime.load_module(p), key, cases, device=device, number=50, repeat=5,
                                     timed=list(timed), cache=cache)
        except Exception as exc:  # noqa: BLE001 - a candidate that faults is dropped, not fatal
            msg = str(exc).splitlines()[0] if str(exc) else repr(exc)
            log(f"attention: {'TVM' if c is None else c.label()} failed to run: {msg}")
            continue
        r["errors"] = {n: list(e) for n, e in r["errors"].items()}
        results.append({"template": "tvm" if c is None else "decode", "config": None if c is None else asdict(c), **r})
    base = next((r for r in results if r["template"] == "tvm"), None)
    if base is None:
        raise AttentionError("TVM's own decode attention kernel could not be measured on this device")
    if not base["ok"]:
        log(f"attention: note: TVM's decode kernel itself misses the NumPy check (out {base['out_err']:.2e}, "
            f"lse {base['lse_err']:.2e})")
    _score(results, base)
    results.sort(key=lambda r: (not r["ok"], not r["eligible"], r["score"]))
    ok = [r for r in results if r["ok"] and r["eligible"] and r["template"] == "decode"]
    rejected = sum(not r["ok"] for r in results)
    best = ok[0] if ok and ok[0]["score"] < 1.0 else None
    if best is None:
        log(f"attention: no decode candidate beats TVM's {DECODE_KERNEL} and passes the check ({rejected} rejected "
            f"by the NumPy check); {ATTENTION_FILE} unchanged")
        return {"entry": None, "results": results, "default": base}
    entry = {
        "kernel": DECODE_KERNEL,
        "key": asdict(key),
        "batches": batches,
        "contexts": contexts,
        "default": base,
        "best": best,
        "speedup": 1 / best["score"],
        "objective": f"geometric mean over batch x context of time / TVM's time, no case more than "
                     f"{100 * (MAX_REGRESSION - 1):.0f}% slower than TVM's",
        "candidates": len(results),
        "rejected_numerics": rejected,
        "tolerance": {"out_rel": DECODE_OUT_RTOL.get(dtype, 2e-3), "lse_abs": DECODE_LSE_ATOL},
        "top": ok[:8],
        "screened": [{"template": r["template"], "config": r["config"], "us": r["us"], "ok": r["ok"],
                      "out_err": r["out_err"], "lse_err": r["lse_err"]} for r in results],
    }
    _write_entry(Path(out_dir), entry, device=device, tuning_s=time.time() - t0)
    per = ", ".join(f"{n}: {base['us'][n]:.2f}->{best['us'][n]:.2f} us" for n in timed) + f", {base.get('timer')}"
    log(f"attention: best decode {DecodeConfig(**best['config']).label()} ({per}; geomean {1 / best['score']:.2f}x "
        f"over TVM's; {rejected} rejected by the NumPy check) in {time.time() - t0:.0f} s -> "
        f"{Path(out_dir) / ATTENTION_FILE}")
    return {"entry": entry, "results": results, "default": base}


def decode_errors(inp: DecodeInputs, ref: tuple, args=None) -> tuple[float, float]:
    """(output error relative to max |reference|, base-2 lse absolute error) of a kernel's results in
    ``args`` (default ``inp.args``); NaN anywhere is an infinite error."""
    args = inp.args if args is None else args
    out, lse = args[7].numpy().astype(np.float32), args[8].numpy()
    if not (np.isfinite(out).all() and np.isfinite(lse).all()):
        return float("inf"), float("inf")
    scale = max(float(np.abs(ref[0]).max()), 1e-6)
    return float(np.abs(out - ref[0]).max()) / scale, float(np.abs(lse - ref[1]).max())


def measure_paged_decode(lib, key, cases: dict, *, device, number: int = 50, repeat: int = 5,
                         timed: Sequence[str] | None = None, cache: dict | None = None,
                         timer: str = "auto") -> dict:
    """Check a built ``batch_decode_paged_kv`` (``lib["main"]``) on every case and time the ``timed`` ones.

    ``cases`` maps a name to the sequences' context lengths; ``cache`` keeps the inputs on the device
    and their NumPy references across kernels (same seeded inputs for every kernel). The result
    has ``us`` (median µs per call), ``timer`` (how: ``"cuda-graph"``, replays of 20 back-to-back calls
    captured in one graph, :mod:`tuning.graph_timer`, or ``"time_evaluator"``, ``repeat`` runs of
    ``number`` calls, launch included), ``errors`` per case (output rel err, lse abs err),
    ``out_err``/``lse_err`` (max) and ``ok`` (within :data:`DECODE_OUT_RTOL` / :data:`DECODE_LSE_ATOL`).
    ``timer="auto"`` (:func:`tuning.graph_timer.resolve_timer`): the CUDA graph where torch with CUDA is
    importable (``time_evaluator``'s launch floor, ~4-5 µs on an H100, hides the differences between
    these kernels), else ``time_evaluator``.
    """
    from .graph_timer import kernel_us, resolve_timer  # pylint: disable=import-outside-toplevel

    timer = resolve_timer(timer, device)
    fn = lib["main"]
    cache = {} if cache is None else cache
    timed = list(cases) if timed is None else list(timed)
    res = {"us": {}, "errors": {}, "timer": timer}
    for i, (name, lens) in enumerate(cases.items()):
        if name not in cache:
            inp = paged_decode_args(key, lens, device=device, seed=i)
            cache[name] = (inp, inp.reference())
        inp, ref = cache[name]
        inp.args[7].copyfrom(np.full(inp.q.shape, np.nan, key.dtype))  # a kernel that writes nothing fails
        inp.args[8].copyfrom(np.full(inp.q.shape[:2], np.nan, np.float32))
        fn(*inp.args, *inp.scalars)
        device.sync()
        res["errors"][name] = decode_errors(inp, ref)
        if name in timed:
            res["us"][name] = kernel_us(lib, [*inp.args, *inp.scalars], device=device, number=number,
                                        repeat=repeat, timer=timer, cold=True)[0]  # (each layer's KV: once a step)
    res["out_err"] = max(e[0] for e in res["errors"].values())
    res["lse_err"] = max(e[1] for e in res["errors"].values())
    res["ok"] = res["out_err"] <= DECODE_OUT_RTOL.get(key.dtype, 2e-3) and res["lse_err"] <= DECODE_LSE_ATOL
    return res
