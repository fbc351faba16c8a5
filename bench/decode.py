"""``bench decode``: token-generation throughput (llama-bench's ``tg``), untuned vs tuned vs peers.

Usage::

    bench decode --batch 8                          # gpt2 on the detected device (q0f16 on CUDA)
    bench decode --batch 1,8,32 --plot tg.png       # sweep, one line per variant
    bench decode --model tiny --device cpu --gen-len 4 --repeats 2 --json out.json

Python API::

    from bench.config import BenchConfig
    from bench.decode import run_decode
    result = run_decode(BenchConfig(model="tiny", device="cpu", repeats=2), batch=[1, 2], gen_len=4)

For each variant and each (batch, prompt length): ``batch`` sequences are prefilled with
``prompt_len`` random tokens (untimed), then ``gen_len`` decode steps are issued back to back
and timed as one pass (test label ``tg<gen_len>@b<batch>``). Reported per row: tokens/s
(``batch`` tokens per step), wall ms per step (what a serving loop sees), GPU ms per step (CUDA
events of the same pass), the step anatomy of the TVM variants (sum of the step's graph-timed
kernel times and ``overhead = wall - kernels``, :mod:`bench.anatomy`), achieved GB/s of the bytes a
step must read (weights + KV cache) over the GPU time (wall time on CPU) and its % of the card's
memory bandwidth, and the speedup over the untuned build of the same run.
"""

from __future__ import annotations

from typing import Any, Callable

from .anatomy import make_anatomy, run_notes
from .config import BenchConfig, BenchError, positive_ints
from .env import peak_to_dict
from .loop import drive, measure_decode
from .report import add_speedups, make_result
from .roofline import decode_bytes, pct
from .setup import log_stderr, setup

__all__ = ["run_decode"]


def run_decode(cfg: BenchConfig, *, batch=(8,), prompt_len=(128,), gen_len: int = 128,
               log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Benchmark decode throughput.

    Parameters
    ----------
    cfg : BenchConfig
        Model, device, variants, measurement and output options.
    batch, prompt_len : int or list of int or "1,8,32"
        Batch sizes and prompt lengths (sweep axes).
    gen_len : int
        Decode steps per run (the ``tg`` of the label).
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
    batches = positive_ints(batch, name="batch")
    prompts = positive_ints(prompt_len, name="prompt-len")
    gens = positive_ints(gen_len, name="gen-len")
    if len(gens) != 1:
        raise BenchError("--gen-len takes one value")
    gen_len = gens[0]
    s = setup(cfg, log=log)
    window = s.config.context_window_size
    if max(prompts) + gen_len > window:
        raise BenchError(f"--prompt-len {max(prompts)} + --gen-len {gen_len} exceeds the context window of "
                         f"{s.model_label} ({window} tokens)")
    if max(batches) > s.config.max_batch_size:
        raise BenchError(f"--batch {max(batches)} exceeds the engine's max batch size {s.config.max_batch_size}")
    graphs = f"cuda-graph {'on' if cfg.cuda_graph else 'off'}, " if s.device.kind == "cuda" else ""
    log(f"bench decode: {s.model_label} {s.quantization} on {s.device.name} ({s.arch}), variants "
        f"{','.join(s.variants)}, batch {batches}, prompt {prompts}, gen {gen_len}, repeats {cfg.repeats}, "
        f"{graphs}timer {s.timer.method}")
    points = [dict(phase="decode", batch=b, prompt_len=p, gen_len=gen_len, seq_len=None)
              for p in prompts for b in batches]

    def measure(runner, p):
        return measure_decode(runner, timer=s.timer, batch=p["batch"], prompt_len=p["prompt_len"],
                              gen_len=gen_len, repeats=cfg.repeats, warmup=cfg.warmup,
                              profile_graph=cfg.graph_kernels)

    def figures(runner, p, m):
        nbytes = decode_bytes(weight_bytes=runner.weight_bytes, kv_bytes_per_token=runner.kv_bytes_per_token,
                              batch=p["batch"], prompt_len=p["prompt_len"], gen_len=gen_len)
        basis = m["gpu_ms"] or m["ms"]
        gb_s = nbytes / (basis.median / 1e3) / 1e9
        return {"bytes_per_step": nbytes, "gb_s": gb_s, "pct_bw": pct(gb_s, s.peak.mem_gb_s if s.peak else None),
                "notes": [f"GB/s over {'GPU' if m['gpu_ms'] else 'wall'} time per step"]}

    opts = dict(cuda_graph=cfg.cuda_graph, cache_dir=cfg.cache_dir, max_batch=max(batches),
                max_tokens=max(batches) * (max(prompts) + gen_len + 16) + 64, check=cfg.check)
    rows = drive(s, points=points, measure=measure, figures=figures, opts=opts, anatomy=make_anatomy(s, cfg, log),
                 log=log)
    add_speedups(rows)
    args = dict(cfg.to_dict(), quantization=s.quantization, variants=s.variants, batch=batches,
                prompt_len=prompts, gen_len=gen_len)
    return make_result(command="decode", args=args, env=s.env, peak=peak_to_dict(s.peak), timer=s.timer.method,
                       rows=rows, notes=s.notes + run_notes(s, cfg))

