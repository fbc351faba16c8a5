"""Result records, the llama-bench-style table, JSON output and sweep plots.

JSON schema (``schema: "gpt2k-bench/1"``; the full field list is in ``bench/SCHEMA.md``)::

    {
      "schema": "gpt2k-bench/1",
      "command": "decode" | "prefill" | "kernels",
      "args": {...},                       # the options the run used (after defaults)
      "env": {...},                        # bench.env.collect_env(): date, host, device, arch,
                                           # cpu, gpu (NVML snapshot), versions, database
      "peak": {"name", "mem_gb_s", "tflops", "source"} | null,
      "timer": "perf_counter" | "cuda-events" | "sync+perf_counter",
      "notes": ["..."],                    # e.g. "no tuned database for sm_90: ..."
      "rows": [ROW, ...]
    }

    decode/prefill ROW:
      model, quantization, device, arch, variant ("untuned"|"tuned"|"torch-eager"|"torch-compile"|"hf-compile"),
      test ("tg128@b8" | "pp1024" | "pp1024@b4"), phase ("decode"|"prefill"),
      batch, prompt_len, gen_len, seq_len, status ("ok"|"error"|"skipped"), error (str|null),
      tok_s {median,p20,p80,mean,min,max,n} | null,
      ms {..} | null           # decode: wall ms per step; prefill: wall ms per prefill of the batch
      gpu_ms {..} | null       # device-event time of the same unit, same pass (CUDA + torch only)
      kernels_ms, overhead_ms  # step anatomy (TVM variants): sum of the step's kernels timed alone; ms - kernels
      anatomy {...} | null     # wall_ms, gpu_ms, kernels_ms, overhead_ms, kernels, calls, tuned, tuned_share, method
      tuned_kernels {...}|null # tuned rows: {tuned, total, share, basis}: n of m kernels tuned, share of step
      gb_s, pct_bw             # decode: (weight + KV bytes read per step) / median step time
      tflops, pct_peak         # prefill: model FLOPs / median prefill time
      bytes_per_step, flops    # the numerators used
      speedup_vs_untuned       # median tok/s of this row / untuned row of the same test
      samples {"wall_ms": [...], "gpu_ms": [...]|null, "tok_s": [...]}  # every sample
      build {...} | null       # library cache key, path, cache_hit, build_s, database
      notes [...]

    kernels ROW:
      name, kind, shape, phase, bucket, weight (calls per step), flops, bytes,
      untuned_us, tuned_us, speedup, cublas_us, sdpa_us (medians, microseconds per call),
      tflops, vs_peer (graph-timed ours / graph-timed cuBLAS or SDPA),
      achieved ("GB/s"|"TFLOP/s"), achieved_value, pct_peak (of the best of tuned/untuned),
      share, share_tuned (fraction of the weighted kernel time of the step),
      tuned_record (database has a record), untuned_from ("symbolic:<name>"|"static"),
      status, error, notes, samples {"untuned_us": [...], "tuned_us": [...]|null, "cublas_us": [...]|null}
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

SCHEMA_VERSION = "gpt2k-bench/1"

__all__ = [
    "SCHEMA_VERSION",
    "test_label",
    "make_result",
    "add_speedups",
    "write_json",
    "read_json",
    "validate_result",
    "plot_sweep",
]

DECODE_PREFILL_ROW_KEYS = (
    "model",
    "quantization",
    "device",
    "arch",
    "variant",
    "test",
    "phase",
    "batch",
    "prompt_len",
    "gen_len",
    "seq_len",
    "status",
    "error",
    "tok_s",
    "ms",
    "gpu_ms",
    "graph_ms",
    "kernels_ms",
    "overhead_ms",
    "gb_s",
    "pct_bw",
    "tflops",
    "pct_peak",
    "bytes_per_step",
    "flops",
    "speedup_vs_untuned",
    "tuned_kernels",
    "anatomy",
    "samples",
    "build",
    "notes",
)
KERNEL_ROW_KEYS = (
    "name",
    "kind",
    "shape",
    "phase",
    "bucket",
    "weight",
    "share",
    "flops",
    "bytes",
    "untuned_us",
    "tuned_us",
    "speedup",
    "cublas_us",
    "sdpa_us",
    "untuned_graph_us",
    "tuned_graph_us",
    "tflops",
    "vs_peer",
    "achieved",
    "achieved_value",
    "pct_peak",
    "share_tuned",
    "tuned_record",
    "untuned_from",
    "status",
    "error",
    "samples",
    "notes",
)
STATS_KEYS = ("median", "p20", "p80", "mean", "min", "max", "n")
TOP_KEYS = ("schema", "command", "args", "env", "peak", "timer", "notes", "rows")


def test_label(*, phase: str, batch: int, prompt_len: int | None = None, gen_len: int | None = None,
              seq_len: int | None = None) -> str:
    """llama-bench style test label: ``tg128@b8`` for decode, ``pp1024`` / ``pp1024@b4`` for prefill."""
    if phase == "decode":
        return f"tg{gen_len}@b{batch}"
    if phase == "prefill":
        return f"pp{seq_len}" + (f"@b{batch}" if batch != 1 else "")
    raise ValueError(f"unknown phase {phase!r}")


def make_result(*, command: str, args: dict[str, Any], env: dict[str, Any], peak: dict | None,
                timer: str, rows: list[dict[str, Any]], notes: Iterable[str] = ()) -> dict[str, Any]:
    """Assemble a result document (see the module docstring for the schema).

    Parameters
    ----------
    command : str
        ``decode``, ``prefill`` or ``kernels``.
    args : dict
        JSON-ready options of the run.
    env : dict
        :func:`bench.env.collect_env` output.
    peak : dict or None
        Roofline figures used for percentages.
    timer : str
        Timing method.
    rows : list of dict
        Result rows.
    notes : iterable of str
        Run-level remarks printed under the table.

    Returns
    -------
    dict
    """
    return {
        "schema": SCHEMA_VERSION,
        "command": command,
        "args": args,
        "env": env,
        "peak": peak,
        "timer": timer,
        "notes": list(notes),
        "rows": rows,
    }


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_untuned`` of every ok row from the untuned row of the same test.

    Rows of one test share ``(model, quantization, device, test)``; the untuned row gets 1.0,
    rows without an ok untuned counterpart get ``None``.
    """
    base: dict[tuple, float] = {}
    for r in rows:
        if r.get("variant") == "untuned" and r.get("status") == "ok" and r.get("tok_s"):
            base[(r["model"], r["quantization"], r["device"], r["test"])] = r["tok_s"]["median"]
    for r in rows:
        key = (r.get("model"), r.get("quantization"), r.get("device"), r.get("test"))
        b = base.get(key)
        if r.get("status") == "ok" and r.get("tok_s") and b:
            r["speedup_vs_untuned"] = r["tok_s"]["median"] / b
        else:
            r["speedup_vs_untuned"] = None


def _jsonable(x: Any) -> Any:
    """Convert numpy scalars/arrays and other odd values so ``json.dump`` accepts them."""
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a result document as indented JSON (parent directories created)."""
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(result), f, indent=1)
        f.write("\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a result document and check it with :func:`validate_result`."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    validate_result(doc)
    return doc


def _check_stats(where: str, s: Any, *, nullable: bool) -> None:
    if s is None:
        if not nullable:
            raise ValueError(f"{where}: missing statistics")
        return
    if not isinstance(s, dict) or set(s) != set(STATS_KEYS):
        raise ValueError(f"{where}: statistics must have exactly {STATS_KEYS}, got {s!r}")
    if not (s["min"] <= s["p20"] <= s["median"] <= s["p80"] <= s["max"]):
        raise ValueError(f"{where}: statistics out of order: {s}")


def validate_result(doc: dict[str, Any]) -> None:
    """Check a result document against the schema; raise ``ValueError`` naming the first problem.

    Checks the top-level keys, the schema version, every row's key set, statistics ordering
    (min <= p20 <= median <= p80 <= max) and that ok rows carry positive throughput.
    """
    if not isinstance(doc, dict):
        raise ValueError("result must be a JSON object")
    missing = [k for k in TOP_KEYS if k not in doc]
    if missing:
        raise ValueError(f"result lacks top-level keys {missing}")
    if doc["schema"] != SCHEMA_VERSION:
        raise ValueError(f"unknown schema {doc['schema']!r} (expected {SCHEMA_VERSION})")
    cmd = doc["command"]
    if cmd not in ("decode", "prefill", "kernels"):
        raise ValueError(f"unknown command {cmd!r}")
    keys = KERNEL_ROW_KEYS if cmd == "kernels" else DECODE_PREFILL_ROW_KEYS
    for i, r in enumerate(doc["rows"]):
        where = f"rows[{i}]"
        if set(r) != set(keys):
            raise ValueError(f"{where}: keys differ from schema: missing {sorted(set(keys) - set(r))}, "
                             f"extra {sorted(set(r) - set(keys))}")
        if r["status"] not in ("ok", "error", "skipped"):
            raise ValueError(f"{where}: bad status {r['status']!r}")
        if r["status"] != "ok":
            if not r.get("error"):
                raise ValueError(f"{where}: non-ok row without an error message")
            continue
        if cmd == "kernels":
            if not (r["untuned_us"] and r["untuned_us"] > 0):
                raise ValueError(f"{where}: ok kernel row without positive untuned time")
            continue
        _check_stats(where + ".tok_s", r["tok_s"], nullable=False)
        _check_stats(where + ".ms", r["ms"], nullable=False)
        _check_stats(where + ".gpu_ms", r["gpu_ms"], nullable=True)
        if r["kernels_ms"] is not None and (r["overhead_ms"] is None or r["kernels_ms"] <= 0):
            raise ValueError(f"{where}: kernels_ms without a positive value and its overhead_ms")
        if r["tok_s"]["median"] <= 0 or r["ms"]["median"] <= 0:
            raise ValueError(f"{where}: non-positive throughput/time")
        if not r["samples"].get("wall_ms"):
            raise ValueError(f"{where}: no raw samples")


def plot_sweep(result: dict[str, Any], path: str | os.PathLike) -> str:
    """Plot tok/s against the swept axis, one line per variant (matplotlib, Agg backend).

    The x axis is the batch size for decode sweeps and the sequence length for prefill sweeps
    (batch when only the batch varies). Error bars span p20..p80. ``path`` gets a PNG.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    RuntimeError
        matplotlib is not installed (``pip install gpt2-kernels[plot]``).
    ValueError
        Nothing to plot (no ok rows).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'gpt2-kernels[plot]'") from e
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        raise ValueError("nothing to plot: no successful rows")
    cmd = result["command"]
    if cmd == "decode":
        xs_key = "batch" if len({r["batch"] for r in rows}) > 1 else "prompt_len"
        other, tag = ("prompt_len", "p") if xs_key == "batch" else ("batch", "b")
    else:
        xs_key = "seq_len" if len({r["seq_len"] for r in rows}) > 1 else "batch"
        other, tag = ("batch", "b") if xs_key == "seq_len" else ("seq_len", "s")
    several = len({r[other] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list] = {}
    for r in rows:  # one line per variant (and per value of the other axis when it varies too)
        label = r["variant"] + (f" {tag}{r[other]}" if several else "")
        lines.setdefault(label, []).append((r[xs_key], r["tok_s"]))
    for label, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        x = [p[0] for p in pts]
        y = [p[1]["median"] for p in pts]
        lo = [p[1]["median"] - p[1]["p20"] for p in pts]
        hi = [p[1]["p80"] - p[1]["median"] for p in pts]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xlabel({"batch": "batch size", "seq_len": "sequence length", "prompt_len": "prompt length"}[xs_key])
    ax.set_ylabel("tokens/s")
    if len({r[xs_key] for r in rows}) > 2:
        ax.set_xscale("log", base=2)
    r0 = rows[0]
    gpu = (result.get("env") or {}).get("gpu") or {}
    where = gpu.get("name") or r0["device"]
    ax.set_title(f"{cmd}: {r0['model']} {r0['quantization']} on {where}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
