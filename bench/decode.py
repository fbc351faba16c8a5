"""``bench decode``: token-generation throughput (llama-bench's ``tg``), untuned vs tuned vs peers.

Usage::

    bench decode --batch 8                          # gpt2 on the detected device (q0f16 on CUDA)
    bench decode --batch 1,8,32 --plot tg.png       # sweep, one line per variant
    bench decode --model tiny --device cpu --gen-len 4 --repeats 2 --json out.json

Python API::

    from bench.decode import run_decode
    result = run_decode(model="tiny", device="cpu", batch=[1, 2], gen_len=4, repeats=2)

For each variant and each (batch, prompt length): ``batch`` sequences are prefilled with
``prompt_len`` random tokens (untimed), then ``gen_len`` decode steps are timed one by one
(test label ``tg<gen_len>@b<batch>``). Reported per row: tokens/s (``batch`` tokens per step),
wall ms per step (host + device, what a serving loop sees), GPU ms per step (CUDA events, host
gaps excluded: the difference to wall time is Python/launch overhead), achieved GB/s of the
bytes a step must read (weights + KV cache) over the GPU time (wall time on CPU) and its % of
the card's memory bandwidth, and the speedup over the untuned build of the same run.
"""

from __future__ import annotations

from typing import Any, Callable

from .common import (
    BenchError,
    _log_default,
    decode_bytes,
    drive,
    measure_decode,
    parse_int_list,
    pct,
    setup,
)
from .env import peak_to_dict
from .report import add_speedups, make_result

__all__ = ["run_decode"]


def run_decode(*, model: str = "gpt2", quantization: str | None = None, batch=(8,), prompt_len=(128,),
               gen_len: int = 128, device: str = "auto", arch: str = "auto", variants=None,
               cuda_graph: bool = True, repeats: int = 5, warmup: int = 1, database_dir: str = "databases",
               database: str | None = None, cache_dir: str | None = None, seed: int = 0,
               peak_bw: float | None = None, peak_tflops: float | None = None, check: bool = True,
               log: Callable[[str], None] = _log_default) -> dict[str, Any]:
    """Benchmark decode throughput.

    Parameters
    ----------
    model : str
        Preset name (``gpt2``, ``gpt2-medium``, ..., ``tiny``) or a Hugging Face directory
        (its config is used; weights are random and seeded: throughput does not depend on them).
    quantization : str, optional
        ``q0f16``, ``q0f32`` or ``q4f16_1``; default ``q0f16`` on CUDA, ``q0f32`` on CPU.
    batch, prompt_len : int or list of int or "1,8,32"
        Sweep axes; one row per (variant, prompt_len, batch).
    gen_len : int
        Decode steps timed per run.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    arch : str
        ``auto`` (detected) or ``sm_XX``; selects the build target and the database.
    variants : str or list, optional
        Subset of ``untuned, tuned, torch-eager, torch-compile`` (``torch`` = both peers).
        Default: all but ``torch-compile`` on CPU, all on CUDA. ``tuned`` is dropped with a
        note when no database exists.
    cuda_graph : bool
        CUDA graphs for the TVM decode (and ``reduce-overhead`` mode for torch.compile).
    repeats, warmup : int
        Kept and discarded runs per row.
    database_dir : str
        Root of the database tree, looked up as ``<database_dir>/<arch>/<model>-<quant>/``.
    database : str, optional
        Explicit database directory for the tuned variant.
    cache_dir : str, optional
        Library cache (default ``~/.cache/gpt2k/libs``).
    seed : int
        Seed of weights and tokens.
    peak_bw, peak_tflops : float, optional
        Roofline overrides (GB/s, TFLOP/s).
    check : bool
        Check TVM logits against the reference before timing.
    log : callable
        Progress messages (stderr by default).

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
    batches = parse_int_list(batch, name="batch")
    prompts = parse_int_list(prompt_len, name="prompt-len")
    gens = parse_int_list(gen_len, name="gen-len")
    if len(gens) != 1:
        raise BenchError("--gen-len takes one value")
    gen_len = gens[0]
    if repeats < 1 or warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    s = setup(model=model, quantization=quantization, device=device, arch=arch, variants=variants,
              database_dir=database_dir, database=database, seed=seed, peak_bw=peak_bw,
              peak_tflops=peak_tflops, log=log)
    window = s.config.context_window_size
    if max(prompts) + gen_len > window:
        raise BenchError(f"--prompt-len {max(prompts)} + --gen-len {gen_len} exceeds the context window of "
                         f"{s.model_label} ({window} tokens)")
    if max(batches) > s.config.max_batch_size:
        raise BenchError(f"--batch {max(batches)} exceeds the engine's max batch size {s.config.max_batch_size}")
    log(f"bench decode: {s.model_label} {s.quantization} on {s.device.name} ({s.arch}), variants "
        f"{','.join(s.variants)}, batch {batches}, prompt {prompts}, gen {gen_len}, repeats {repeats}, "
        f"cuda-graph {'on' if cuda_graph else 'off'}, timer {s.timer.method}")
    points = [dict(phase="decode", batch=b, prompt_len=p, gen_len=gen_len, seq_len=None)
              for p in prompts for b in batches]

    def measure(runner, p):
        return measure_decode(runner, timer=s.timer, batch=p["batch"], prompt_len=p["prompt_len"],
                              gen_len=gen_len, repeats=repeats, warmup=warmup)

    def figures(runner, p, m):
        nbytes = decode_bytes(weight_bytes=runner.weight_bytes, kv_bytes_per_token=runner.kv_bytes_per_token,
                              batch=p["batch"], prompt_len=p["prompt_len"], gen_len=gen_len)
        basis = m["gpu_ms"] or m["ms"]
        gb_s = nbytes / (basis.median / 1e3) / 1e9
        return {"bytes_per_step": nbytes, "gb_s": gb_s, "pct_bw": pct(gb_s, s.peak.mem_gb_s if s.peak else None),
                "notes": [f"GB/s over {'GPU' if m['gpu_ms'] else 'wall'} time per step"]}

    opts = dict(cuda_graph=cuda_graph, cache_dir=cache_dir, max_batch=max(batches),
                max_tokens=max(batches) * (max(prompts) + gen_len + 16) + 64, check=check)
    rows = drive(s, phase="decode", points=points, measure=measure, figures=figures, opts=opts, log=log)
    add_speedups(rows)
    args = {"model": model, "quantization": s.quantization, "batch": batches, "prompt_len": prompts,
            "gen_len": gen_len, "device": device, "arch": arch, "variants": s.variants, "cuda_graph": cuda_graph,
            "repeats": repeats, "warmup": warmup, "database_dir": str(database_dir), "database": database,
            "cache_dir": cache_dir, "seed": seed, "peak_bw": peak_bw, "peak_tflops": peak_tflops, "check": check}
    return make_result(command="decode", args=args, env=s.env, peak=peak_to_dict(s.peak), timer=s.timer.method,
                       rows=rows, notes=s.notes + [f"GPU timer: {v}" for v in s.timer.info.values()])
