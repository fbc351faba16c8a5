"""``bench prefill``: prompt-processing throughput (llama-bench's ``pp``), untuned vs tuned vs peers.

Usage::

    bench prefill --seq-len 128,512,1024                  # gpt2, batch 1 (q0f16 on CUDA)
    bench prefill --seq-len 1024 --batch 4 --json pp.json
    bench prefill --model tiny --device cpu --seq-len 16,32 --repeats 2 --plot pp.png

Python API::

    from bench.prefill import run_prefill
    result = run_prefill(model="tiny", device="cpu", seq_len=[16, 32], repeats=2)

Each sample prefills ``batch`` empty sequences with ``seq_len`` random tokens each (test label
``pp<seq_len>``, ``pp<seq_len>@b<batch>`` for batch > 1), chunked at the model's
``prefill_chunk_size`` (one sequence after the other, as the engine does), logits of each sequence's last
position left on the device. Reported per row: tokens/s, wall ms per prefill, GPU ms (CUDA
events), achieved TFLOP/s (model matmul FLOPs over GPU time, wall time on CPU) and % of the
card's dense peak for the model's dtype, speedup over untuned.
"""

from __future__ import annotations

from typing import Any, Callable

from .common import (
    BenchError,
    _log_default,
    drive,
    measure_prefill,
    parse_int_list,
    pct,
    prefill_flops,
    setup,
)
from .env import peak_to_dict
from .report import add_speedups, make_result

__all__ = ["run_prefill"]


def run_prefill(*, model: str = "gpt2", quantization: str | None = None, seq_len=(128, 512, 1024), batch=(1,),
                device: str = "auto", arch: str = "auto", variants=None, cuda_graph: bool = True,
                repeats: int = 5, warmup: int = 1, database_dir: str = "databases", database: str | None = None,
                cache_dir: str | None = None, seed: int = 0, peak_bw: float | None = None,
                peak_tflops: float | None = None, check: bool = True,
                log: Callable[[str], None] = _log_default) -> dict[str, Any]:
    """Benchmark prefill throughput.

    Parameters
    ----------
    model, quantization, device, arch, variants, cuda_graph, repeats, warmup, database_dir,
    database, cache_dir, seed, peak_bw, peak_tflops, check, log
        As in :func:`bench.decode.run_decode`.
    seq_len : int or list of int or "128,512"
        Prompt lengths (sweep axis); each at most the context window.
    batch : int or list of int
        Sequences prefilled together (sweep axis).

    Returns
    -------
    dict
        Result document (schema in ``bench/report.py`` and ``bench/SCHEMA.md``).

    Raises
    ------
    BenchError
        Bad options.
    bench.build.DatabaseError
        The database for the tuned variant belongs to another arch (or is corrupt).
    """
    seqs = parse_int_list(seq_len, name="seq-len")
    batches = parse_int_list(batch, name="batch")
    if repeats < 1 or warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    s = setup(model=model, quantization=quantization, device=device, arch=arch, variants=variants,
              database_dir=database_dir, database=database, seed=seed, peak_bw=peak_bw,
              peak_tflops=peak_tflops, log=log)
    window = s.config.context_window_size
    if max(seqs) > window:
        raise BenchError(f"--seq-len {max(seqs)} exceeds the context window of {s.model_label} ({window} tokens)")
    if max(batches) > s.config.max_batch_size:
        raise BenchError(f"--batch {max(batches)} exceeds the engine's max batch size {s.config.max_batch_size}")
    log(f"bench prefill: {s.model_label} {s.quantization} on {s.device.name} ({s.arch}), variants "
        f"{','.join(s.variants)}, seq-len {seqs}, batch {batches}, repeats {repeats}, timer {s.timer.method}")
    points = [dict(phase="prefill", batch=b, prompt_len=None, gen_len=None, seq_len=n)
              for b in batches for n in seqs]

    def measure(runner, p):
        return measure_prefill(runner, timer=s.timer, batch=p["batch"], seq_len=p["seq_len"],
                               repeats=repeats, warmup=warmup)

    def figures(runner, p, m):
        flops = prefill_flops(s.config, batch=p["batch"], seq_len=p["seq_len"])
        basis = m["gpu_ms"] or m["ms"]
        tflops = flops / (basis.median / 1e3) / 1e12
        return {"flops": flops, "tflops": tflops, "pct_peak": pct(tflops, s.peak.tflops if s.peak else None),
                "notes": [f"TFLOP/s over {'GPU' if m['gpu_ms'] else 'wall'} time"]}

    opts = dict(cuda_graph=cuda_graph, cache_dir=cache_dir, max_batch=max(batches),
                max_tokens=max(batches) * (max(seqs) + 16) + 64, check=check)
    rows = drive(s, phase="prefill", points=points, measure=measure, figures=figures, opts=opts, log=log)
    add_speedups(rows)
    args = {"model": model, "quantization": s.quantization, "seq_len": seqs, "batch": batches, "device": device,
            "arch": arch, "variants": s.variants, "cuda_graph": cuda_graph, "repeats": repeats, "warmup": warmup,
            "database_dir": str(database_dir), "database": database, "cache_dir": cache_dir, "seed": seed,
            "peak_bw": peak_bw, "peak_tflops": peak_tflops, "check": check}
    return make_result(command="prefill", args=args, env=s.env, peak=peak_to_dict(s.peak), timer=s.timer.method,
                       rows=rows, notes=s.notes + [f"GPU timer: {v}" for v in s.timer.info.values()])
