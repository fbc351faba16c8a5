"""The printed tables of ``bench``: llama-bench-style decode/prefill rows and the kernels table.

Both fit 120 columns in the default ``github`` style: columns that are empty for every row (GPU
time, cuBLAS/SDPA and graph columns on a CPU) are dropped, long kernel names are shortened, and
the run's model, quantization and device are printed once above the table instead of per row.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_table", "format_kernel_table", "MAX_WIDTH"]

MAX_WIDTH = 120


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if x != 0 and abs(x) < 0.1:
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def _tabulate(body, headers, tablefmt: str) -> str:
    """``tabulate`` without its 2-space minimum header padding (keeps the tables narrow)."""
    import tabulate as tab

    old = tab.MIN_PADDING
    tab.MIN_PADDING = 0
    try:
        return tab.tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    finally:
        tab.MIN_PADDING = old


def _drop_empty(headers: list[str], body: list[list[str]], keep: int) -> tuple[list[str], list[list[str]]]:
    """Drop columns (after the first ``keep``) whose every cell is empty or ``-``."""
    cols = [i for i in range(len(headers)) if i < keep or any(r[i] not in ("", "-") for r in body)]
    return [headers[i] for i in cols], [[r[i] for i in cols] for r in body]


def _header(result: dict[str, Any]) -> str:
    rows = result["rows"]
    r0 = rows[0] if rows else {}
    env = result.get("env") or {}
    gpu = (env.get("gpu") or {}).get("name")
    dev = r0.get("device") or env.get("device") or "?"
    where = f"{dev} ({r0.get('arch') or env.get('arch')}" + (f", {gpu})" if gpu else ")")
    line = f"{r0.get('model', '?')} {r0.get('quantization', '?')} on {where}"
    graphs_apply = result.get("command") != "kernels" and "cuda_graph" in (result.get("args") or {})
    if str(dev).startswith("cuda") and graphs_apply:
        line += f", CUDA graphs {'on' if result['args']['cuda_graph'] else 'off'}"
    for key, value in (env.get("settings") or {}).items():  # engine settings from the environment
        line += f", {key}={value}"
    return line + f", timer {result.get('timer')}"


def format_table(result: dict[str, Any], *, tablefmt: str = "github") -> str:
    """The decode/prefill result table plus notes.

    Columns: variant | test | tok/s | ± | ms/step (wall) | GPU ms | graph ms | in-graph kernels ms |
    kernels ms | overhead ms |
    GB/s (%bw) for decode or TFLOP/s (%pk) for prefill | speedup. Empty columns are dropped.
    A tuned row shows how many of its test's kernels the database tunes (``tuned 5/9``).
    """
    decode = result["command"] == "decode"
    headers = ["variant", "test", "tok/s", "±", "ms/step" if decode else "ms", "GPU ms", "graph ms",
               "in-graph kernels ms", "kernels ms", "overhead ms", "GB/s (%bw)" if decode else "TFLOP/s (%pk)",
               "speedup"]
    body, row_notes = [], []
    for r in result["rows"]:
        variant = r["variant"]
        tk = r.get("tuned_kernels")
        if tk:
            variant += f" {tk['tuned']}/{tk['total']}"
        if r["status"] != "ok":
            msg = (r.get("error") or r["status"]).splitlines()[0]
            body.append([variant, r["test"], r["status"].upper(), "", msg[:60], "", "", "", "", "", "", ""])
            continue
        tok, ms, gms = r["tok_s"], r["ms"], r.get("gpu_ms")
        value, p = (r.get("gb_s"), r.get("pct_bw")) if decode else (r.get("tflops"), r.get("pct_peak"))
        perf = "-" if value is None else _fmt(value) + (f" ({p:.0f}%)" if p is not None else "")
        sp = r.get("speedup_vs_untuned")
        body.append([variant, r["test"], _fmt(tok["median"]), _fmt((tok["p80"] - tok["p20"]) / 2),
                     _fmt(ms["median"], 3), _fmt(gms["median"], 3) if gms else "-", _fmt(r.get("graph_ms"), 3),
                     _fmt(((r.get("anatomy") or {}).get("graph_kernels") or {}).get("ms"), 3),
                     _fmt(r.get("kernels_ms"), 3), _fmt(r.get("overhead_ms"), 3), perf,
                     f"{sp:.2f}x" if sp is not None else "-"])
        for n in r.get("notes") or []:
            if n.startswith("PyTorch on the CPU"):  # the same for every test of the variant
                row_notes.append(f"{r['variant']}: {n}")
            elif n.startswith(("tuned kernels", "kernels timed alone")) or "not among" in n:
                row_notes.append(f"{r['variant']} {r['test']}: {n}")
    headers, body = _drop_empty(headers, body, keep=5)
    out = _header(result) + "\n\n" + _tabulate(body, headers, tablefmt)
    legend = ["± = half the p20..p80 range of tok/s over the measured runs"]
    if "graph ms" in headers:
        legend.append("graph ms = GPU time of one step's whole-step CUDA graph replayed alone (the step's kernels "
                      "back to back, the KV cache's included); ms/step - graph ms = host work the GPU waited for")
    if "in-graph kernels ms" in headers:
        legend.append("in-graph kernels ms = the device time of every kernel in that graph's replays (CUPTI), the KV "
                      "cache's included; graph ms - in-graph kernels ms = gaps between the graph's kernels")
    if "kernels ms" in headers:
        legend.append("kernels ms = the step's kernels timed one by one (graph-timed on CUDA); "
                      "overhead ms = ms/step - kernels ms")
    out += "\n" + "\n".join(legend)
    notes = list(result.get("notes") or []) + list(dict.fromkeys(row_notes))
    if notes:
        out += "\n\n" + "\n".join(f"note: {n}" for n in notes)
    return out


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def format_kernel_table(result: dict[str, Any], *, tablefmt: str = "github", top: int | None = None) -> str:
    """The ``bench kernels`` table, heaviest kernels first, at most :data:`MAX_WIDTH` columns wide.

    Columns: kernel ×calls | untuned µs | tuned µs | ± | speedup | peer µs (cuBLAS or SDPA) |
    tuned/peer | TFLOP/s | achieved (GB/s and % of peak, or % of the compute peak) | share. On CUDA the µs columns are
    CUDA-graph timed (what the peer column is compared with); elsewhere ``time_evaluator``.
    """
    rows = sorted(result["rows"], key=lambda r: -(r.get("share") or 0.0))
    if top:
        rows = rows[:top]
    graph = any(r.get("untuned_graph_us") for r in rows)
    headers = ["kernel ×calls", "untuned", "tuned", "±", "speedup", "peer", "tuned/peer", "TFLOP/s", "achieved",
               "share"]
    body = []
    for r in rows:
        name = f"{r['name']} ×{r.get('weight', '')}"
        if r["status"] != "ok":
            body.append([name, r["status"].upper(), ((r.get("error") or "").splitlines() or [""])[0][:50],
                         "", "", "", "", "", "", ""])
            continue
        unt = r.get("untuned_graph_us") if graph else r.get("untuned_us")
        tun = r.get("tuned_graph_us") if graph else r.get("tuned_us")
        samples = (r.get("samples") or {}).get("tuned_us") or (r.get("samples") or {}).get("untuned_us") or []
        spread = "-"
        if len(samples) > 1:
            from .timing import stats

            st = stats(samples)
            spread = _fmt(st.spread)
        peer = r.get("cublas_us") or r.get("sdpa_us")
        ach = "-"
        if r.get("achieved") == "TFLOP/s":  # the TFLOP/s column has the value; here its share of the peak
            ach = f"{r['pct_peak']:.0f}% pk" if r.get("pct_peak") is not None else "-"
        elif r.get("achieved_value") is not None:
            ach = f"{_fmt(r['achieved_value'])} GB/s" + (f" {r['pct_peak']:.0f}%" if r.get("pct_peak") is not None
                                                         else "")
        body.append([
            name, _fmt(unt),
            (_fmt(tun) + ("" if r.get("tuned_record") in (None, True) else "*")) if tun else "-",
            spread,
            f"{unt / tun:.2f}x" if unt and tun else "-",
            (_fmt(peer) + (" sdpa" if r.get("sdpa_us") else "")) if peer else "-",
            f"{r['vs_peer']:.2f}x" if r.get("vs_peer") else "-",
            _fmt(r.get("tflops")),
            ach,
            f"{100 * r['share']:.1f}%" if r.get("share") is not None else "-",
        ])
    headers, body = _drop_empty(headers, body, keep=3)
    width = 60
    while True:
        short = [[_short(b[0], width)] + b[1:] for b in body]
        table = _tabulate(short, headers, tablefmt)
        if max(len(line) for line in table.splitlines()) <= MAX_WIDTH or width <= 16:
            break
        width -= 2
    legend = [("untuned/tuned/peer: µs per call, CUDA-graph replays (no launch cost, as the peer)" if graph
               else "untuned/tuned: µs per call, TVM time_evaluator (back-to-back calls)"),
              "achieved: GB/s (% of the memory peak) for memory-bound kernels, % of the compute peak for GEMMs",
              "± = half the p20..p80 range of the tuned (else untuned) time_evaluator repeats; * = no database "
              "record (the tuned build runs the untuned kernel)"]
    if "peer" in headers:
        legend.append("peer = cuBLAS (torch.matmul, no fused epilogue) for GEMM/GEMV, torch SDPA flash for "
                      "attention; tuned/peer = graph-timed tuned (else untuned) over graph-timed peer")
    out = _header(result) + "\n\n" + table + "\n" + "\n".join(legend)
    if result.get("notes"):
        out += "\n\n" + "\n".join(f"note: {n}" for n in result["notes"])
    return out
