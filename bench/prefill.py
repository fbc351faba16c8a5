"""``bench prefill``: prompt-processing throughput (llama-bench's ``pp``), untuned vs tuned vs peers.

Usage::

    bench prefill --seq-len 128,512,1024                  # gpt2, batch 1 (q0f16 on CUDA)
    bench prefill --seq-len 1024 --batch 4 --json pp.json
    bench prefill --model tiny --device cpu --seq-len 16,32 --repeats 2 --plot pp.png

Python API::

    from bench.config import BenchConfig
    from bench.prefill import run_prefill
    result = run_prefill(BenchConfig(model="tiny", device="cpu", repeats=2), seq_len=[16, 32])

Each sample prefills ``batch`` empty sequences with ``seq_len`` random tokens each (test label
``pp<seq_len>``, ``pp<seq_len>@b<batch>`` for batch > 1), chunked at the model's
``prefill_chunk_size`` (one sequence after the other, as the engine does), logits of each
sequence's last position left on the device. Reported per row: tokens/s, wall ms per prefill,
GPU ms (CUDA events of the same pass), the step anatomy of the TVM variants (kernel sum and
overhead, :mod:`bench.anatomy`), achieved TFLOP/s (model matmul FLOPs over GPU time, wall time on
CPU) and % of the card's dense peak for the model's dtype, speedup over untuned.
"""

from __future__ import annotations

from typing import Any, Callable

from .anatomy import make_anatomy, run_notes
from .config import BenchConfig, BenchError, positive_ints
from .env import peak_to_dict
from .loop import drive, measure_prefill
from .report import add_speedups, make_result
from .roofline import pct, prefill_flops
from .setup import log_stderr, setup

__all__ = ["run_prefill"]


def run_prefill(cfg: BenchConfig, *, seq_len=(128, 512, 1024), batch=(1,),
                log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Benchmark prefill throughput.

    Parameters
    ----------
    cfg : BenchConfig
        Model, device, variants, measurement and output options.
    seq_len : int or list of int or "128,512"
        Prompt lengths (sweep axis); each at most the context window.
    batch : int or list of int
        Sequences prefilled together (sweep axis).
    log : callable
        Progress messages (stderr by default).

    Returns
    -------
    dict
        Result document (schema in ``bench/SCHEMA.md``).

    Raises
    ------
    BenchError
        Bad options.
    bench.build.DatabaseError
        The database for the tuned variant belongs to another arch (or is corrupt).
    """
    seqs = positive_ints(seq_len, name="seq-len")
    batches = positive_ints(batch, name="batch")
    s = setup(cfg, log=log)
    window = s.config.context_window_size
    if max(seqs) > window:
        raise BenchError(f"--seq-len {max(seqs)} exceeds the context window of {s.model_label} ({window} tokens)")
    if max(batches) > s.config.max_batch_size:
        raise BenchError(f"--batch {max(batches)} exceeds the engine's max batch size {s.config.max_batch_size}")
    log(f"bench prefill: {s.model_label} {s.quantization} on {s.device.name} ({s.arch}), variants "
        f"{','.join(s.variants)}, seq-len {seqs}, batch {batches}, repeats {cfg.repeats}, timer {s.timer.method}")
    points = [dict(phase="prefill", batch=b, prompt_len=None, gen_len=None, seq_len=n)
              for b in batches for n in seqs]

    def measure(runner, p):
        return measure_prefill(runner, timer=s.timer, batch=p["batch"], seq_len=p["seq_len"],
                               repeats=cfg.repeats, warmup=cfg.warmup,
                              profile_graph=cfg.graph_kernels)

    def figures(runner, p, m):
        flops = prefill_flops(s.config, batch=p["batch"], seq_len=p["seq_len"])
        basis = m["gpu_ms"] or m["ms"]
        tflops = flops / (basis.median / 1e3) / 1e12
        return {"flops": flops, "tflops": tflops, "pct_peak": pct(tflops, s.peak.tflops if s.peak else None),
                "notes": [f"TFLOP/s over {'GPU' if m['gpu_ms'] else 'wall'} time"]}

    opts = dict(cuda_graph=cfg.cuda_graph, cache_dir=cfg.cache_dir, max_batch=max(batches),
                max_tokens=max(batches) * (max(seqs) + 16) + 64, check=cfg.check)
    rows = drive(s, points=points, measure=measure, figures=figures, opts=opts, anatomy=make_anatomy(s, cfg, log),
                 log=log)
    add_speedups(rows)
    args = dict(cfg.to_dict(), quantization=s.quantization, variants=s.variants, seq_len=seqs, batch=batches)
    return make_result(command="prefill", args=args, env=s.env, peak=peak_to_dict(s.peak), timer=s.timer.method,
                       rows=rows, notes=s.notes + run_notes(s, cfg))
