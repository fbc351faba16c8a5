"""``bench kernels``: every kernel of one decode step or prefill chunk, untuned vs tuned vs cuBLAS.

Usage::

    bench kernels --phase decode --batch 8          # kernels of a decode step of 8 sequences
    bench kernels --phase prefill --seq-len 1024    # kernels of a 1024-token prefill chunk
    bench kernels --model tiny --device cpu --phase decode --batch 2 --json k.json

Python API::

    from bench.kernels import run_kernels
    result = run_kernels(model="tiny", device="cpu", phase="decode", batch=2, repeats=3)

The kernels are the tasks of ``tuning.partition`` at one bucket: the static-shape PrimFuncs of
``batch_decode_b<B>`` / ``prefill_s<S>`` after the shared preparation pipeline, each with its
call count per step (``weight``), FLOPs and minimal bytes. For each kernel:

``untuned``
    What the untuned library runs at this shape: the *symbolic-shape* kernel of
    ``batch_decode`` / ``prefill`` that computes the same thing (found by specializing each
    symbolic kernel to the bucket and comparing structurally), scheduled by dlight on GPUs
    (default LLVM pipeline on CPUs) and called with the bucket's shapes. When fusion differs
    between the symbolic and the static function and no counterpart exists, the static kernel
    under dlight is used (``untuned_from: "static"``).
``tuned``
    What the tuned library runs: the database's schedule of the static kernel
    (``tuning.apply.apply_database``), dlight where the database has no record
    (``tuned_record`` false).
    Before it is timed, the tuned kernel's output is compared with the untuned kernel's on the
    same random inputs (:data:`KERNEL_RTOL`); a mismatch makes the row an error.
``cuBLAS``
    ``torch.matmul`` of the same (M, N, K) in the activation dtype, for GEMM/GEMV kernels, when
    torch sees the CUDA device (the fused bias/activation epilogue is not included).
``attention`` (``--phase prefill``, CUDA)
    One extra row: the KV cache's prefill attention kernel (``batch_prefill_ragged_kv``: TVM's
    template for untuned, the database's ``attention.json`` choice for tuned), checked against
    NumPy, next to ``torch.nn.functional.scaled_dot_product_attention`` (flash backend, causal,
    (1, heads, L, head_dim)) on the same shapes; both graph-timed.

Times come from TVM's ``time_evaluator`` (device timers, back-to-back calls: caches are
warm; a kernel whose bytes fit in L2 can show more than DRAM bandwidth, flagged in the notes).
``share`` is the kernel's fraction of the summed weighted kernel time of the step (untuned;
``share_tuned`` for the tuned build). KV-cache attention runs inside the cache's own
pre-built kernels and is not part of the partition, so shares are of the partitioned kernels.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .build import locate_database
from .checks import first_line
from .config import BenchConfig, BenchError
from .env import peak_to_dict
from .report import make_result
from .roofline import matmul_tflops, pct
from .setup import env_and_peak, log_stderr, resolve_target
from .timing import stats

__all__ = ["run_kernels", "bucket_tasks", "untuned_kernel", "tuned_kernel", "time_kernel",
           "random_args", "compare_outputs", "compile_kernel", "attention_row", "wgmma_kernel"]


def _template_kernels(db_dir, *, phase: str, bucket: int) -> list[str]:
    """Names of the ``norm_gemv.json`` entries a tuned build of this decode bucket uses."""
    if phase != "decode":
        return []
    from tuning.norm_gemv_tune import read_norm_gemv_plan  # pylint: disable=import-outside-toplevel

    plan = read_norm_gemv_plan(db_dir)
    return sorted(n for n in (plan.configs if plan else {}) if n.startswith(f"b{bucket}_"))

def random_args(func, *, device, seed: int = 0) -> list:
    """Device tensors for every buffer parameter of a static PrimFunc.

    Floats ~ N(0, 0.1) (finite in fp16), unsigned ints random bits (packed 4-bit codes), signed
    ints zero (gather indices must be in range).
    """
    import tvm

    rng = np.random.default_rng(seed)
    out = []
    for p in func.params:
        if not hasattr(p, "shape"):
            raise BenchError(f"kernel parameter {p} is not a buffer")
        shape = tuple(int(d) for d in p.shape)
        dt = str(p.dtype)
        if dt.startswith("float"):
            a = (rng.standard_normal(shape) * 0.1).astype(dt)
        elif dt.startswith("uint"):
            a = rng.integers(0, np.iinfo(dt).max, shape, dtype=dt, endpoint=True)
        else:
            a = np.zeros(shape, dt)
        out.append(tvm.runtime.tensor(a, device))
    return out


def _compile(func, *, target, scheduled_mod=None):
    import tvm

    from tuning.builder import build_kernel

    mod = scheduled_mod if scheduled_mod is not None else tvm.IRModule({"main": func})
    mod = tvm.IRModule({"main": mod["main"].with_attr("global_symbol", "main")})
    # the tuner's and the library's build config (cp.async for the mma space's pipelines): a kernel
    # built without it is not the kernel the library runs
    ex = build_kernel(mod, target)
    return ex.jit() if hasattr(ex, "jit") else ex  # a runtime Module (has time_evaluator)


def time_kernel(lib, args, *, device, repeats: int, min_repeat_ms: float) -> list[float]:
    """Microseconds per call of ``lib["main"](*args)``, one value per repeat (device timers).

    One warm-up call first; ``time_evaluator`` raises the call count until a repeat lasts at
    least ``min_repeat_ms``.
    """
    lib["main"](*args)
    device.sync()
    te = lib.time_evaluator("main", device, number=1, repeat=repeats, min_repeat_ms=int(min_repeat_ms))
    return [float(x) * 1e6 for x in te(*args).results]


#: max |tuned - untuned| / max |untuned| over a kernel's buffers, per dtype of its outputs
KERNEL_RTOL = {"float32": 1e-3, "float16": 2e-2}


def compare_outputs(lib_a, lib_b, func, *, device, seed: int = 0) -> float:
    """Run two builds of one kernel on identical random inputs; max relative difference.

    Every buffer is compared after the call (inputs are untouched, outputs must agree):
    ``max |a - b| / max |a|`` over the buffers written, 0.0 when identical.
    """
    args_a = random_args(func, device=device, seed=seed)
    args_b = random_args(func, device=device, seed=seed)
    before = [x.numpy() for x in args_a]
    lib_a["main"](*args_a)
    lib_b["main"](*args_b)
    worst = 0.0
    for x0, a, b in zip(before, args_a, args_b):
        a, b = a.numpy(), b.numpy()
        if np.array_equal(a, x0) and np.array_equal(b, x0):
            continue  # an input
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        denom = max(float(np.abs(a64).max()), 1e-30)
        err = float(np.abs(a64 - b64).max()) / denom
        worst = max(worst, err if np.isfinite(err) else float("inf"))
    return worst


def bucket_tasks(config, *, quantization: str, target, phase: str, bucket: int):
    """The partition's tasks of one bucket (with their symbolic twins) and the prepared module."""
    from gpt2_model.export import export_model
    from tuning.partition import attach_twins, tasks_of
    from tuning.pipeline import prepare

    buckets = {phase: [bucket]}
    exported = export_model(config, quantization=quantization, target=target, buckets=buckets)
    prepared = prepare(exported.mod, target=target)
    return attach_twins(prepared, tasks_of(prepared, buckets)), prepared


def compile_kernel(func, target):
    """Compile one PrimFunc under dlight (what the library does with an unscheduled kernel)."""
    import tvm

    from tuning.compile import apply_dlight

    mod = apply_dlight(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return _compile(None, target=target, scheduled_mod=mod)


def untuned_kernel(task, *, prepared, target):
    """Compiled kernel the untuned library runs for ``task`` (as ``tuning.compile`` schedules it:
    its symbolic twin's dlight schedule specialized to the bucket, else dlight on the static one)."""
    from tuning.apply import schedule_like_untuned

    return compile_kernel(schedule_like_untuned(prepared, target=target, task_list=[task])[task.kernel], target)


def tuned_kernel(task, *, prepared, database, target, untuned_us=None):
    """Compiled kernel the tuned library runs for ``task`` (as ``tuning.compile`` applies the
    database). Returns ``(module, has_record)``; without an applied record it is the untuned one."""
    from tuning.apply import apply_database

    mod, applied = apply_database(prepared, database=database, target=target, task_list=[task],
                                  untuned_us=untuned_us)
    if task.kernel not in applied:
        return untuned_kernel(task, prepared=prepared, target=target), False
    return compile_kernel(mod[task.kernel], target), True


def wgmma_kernel(db_dir, task, *, bucket: int, target, phase: str = "prefill"):
    """``(module, label)`` of the wgmma kernel the tuned build runs for this GEMM of a prefill chunk or
    a decode batch (its ``wgmma_gemm.json`` entry, built for sm_90a), or None when the database names
    none for it (or, for a decode GEMM, when its fused norm + GEMV kernel runs it instead)."""
    # pylint: disable=import-outside-toplevel
    from gpt2_model.wgmma_build import build
    from gpt2_model.wgmma_gemm import make_gemm
    from tuning.norm_gemv_tune import read_norm_gemv_plan
    from tuning.wgmma_tune import fused_elsewhere, gemm_plan_for

    plan = gemm_plan_for(db_dir, target)
    mnk = _mnk(task.func) if task.kind in ("gemm", "gemv") else None
    found = plan.find(bucket, mnk[1], mnk[2], mnk[3], rows=phase == "decode") \
        if plan is not None and mnk is not None and mnk[0] == bucket else None
    if found is None or fused_elsewhere(found[0], read_norm_gemv_plan(db_dir)):
        return None
    key, cfg = found
    return build(make_gemm(key, cfg, name="main")), f"wgmma {cfg.label()} ({key.name()})"


def _mnk(func) -> tuple[int, int, int, str] | None:
    """(M, N, K, dtype) of a matmul kernel: first input (..., K), output (..., N)."""
    bufs = [p for p in func.params if hasattr(p, "shape")]
    if len(bufs) < 2:
        return None
    x, out = bufs[0], bufs[-1]
    if not str(x.dtype).startswith("float") or len(x.shape) < 1:
        return None
    k = int(x.shape[-1])
    m = int(np.prod([int(d) for d in x.shape[:-1]])) if len(x.shape) > 1 else 1
    n = int(out.shape[-1])
    return m, n, k, str(x.dtype)


def _shape_str(func) -> str:
    return " ".join("x".join(str(int(d)) for d in p.shape) for p in func.params if hasattr(p, "shape"))


def _graph_or_note(lib, args, device_name: str, repeats: int, row: dict) -> list[float] | None:
    """Microseconds per call of ``lib["main"](*args)`` from CUDA-graph replays, as cuBLAS is timed
    (no host launch cost); ``None`` off CUDA or without torch, or with a note when capture fails."""
    if not device_name.startswith("cuda"):
        return None
    try:
        from tuning.graph_timer import tvm_graph_us

        return tvm_graph_us(lib["main"], args, device=device_name, repeats=repeats)
    except ImportError:  # no torch
        return None
    except Exception as e:  # noqa: BLE001 - the graph column is extra; its failure is a note
        row["notes"].append(f"CUDA-graph timing failed: {first_line(e)}")
        return None


_ROW_KEYS = ("untuned_us", "tuned_us", "speedup", "cublas_us", "sdpa_us", "untuned_graph_us", "tuned_graph_us",
             "tflops", "vs_peer", "achieved", "achieved_value", "pct_peak", "share", "share_tuned", "tuned_record",
             "untuned_from", "error")


def _new_row(*, name: str, kind: str, shape: str, phase: str, bucket: int, weight: int, flops: float,
             nbytes: int) -> dict[str, Any]:
    row = {k: None for k in _ROW_KEYS}
    row.update(name=name, kind=kind, shape=shape, phase=phase, bucket=bucket, weight=int(weight), flops=float(flops),
               bytes=int(nbytes), status="ok", samples={"untuned_us": None, "tuned_us": None, "cublas_us": None},
               notes=[])
    return row


def _peer_figures(row: dict, peer_us: float | None) -> None:
    """TFLOP/s of the kernel the library runs and its time over the peer's, graph-timed both
    when the graph columns exist (else the time_evaluator figures)."""
    ours = row["tuned_graph_us"] or row["untuned_graph_us"] or row["tuned_us"] or row["untuned_us"]
    if row["kind"] in ("gemm", "gemv", "attention"):
        row["tflops"] = matmul_tflops(row["flops"], ours)
    if peer_us and (row["tuned_graph_us"] or row["untuned_graph_us"]):
        row["vs_peer"] = (row["tuned_graph_us"] or row["untuned_graph_us"]) / peer_us


def stored_prefill_config(attention: dict | None, key):
    """The stored ``batch_prefill_ragged_kv`` choice of an ``attention.json`` for ``key`` (its template's
    config object, as compile applies it: SIMT constants or the tensor-core template), or ``None``."""
    from tuning.attention import AttentionKey, stored_best

    for entry in (attention or {}).get("kernels", []):
        if (entry.get("kernel", "batch_prefill_ragged_kv") == "batch_prefill_ragged_kv"
                and AttentionKey(**entry["key"]) == key):
            return stored_best(entry)
    return None


def attention_row(s, *, bucket: int, attention: dict | None, repeats: int, log) -> dict[str, Any] | None:
    """The prefill attention row: the KV cache's ``batch_prefill_ragged_kv`` (untuned: TVM's template;
    tuned: the database's ``attention.json`` choice) vs torch SDPA (flash, causal), graph-timed both.

    ``attention`` is the database's ``attention.json`` (``TunedDatabase.attention``) or ``None``.
    ``None`` off CUDA (the kernel is a GPU template). Each TVM kernel is checked against NumPy first.
    """
    if s.device.kind != "cuda":
        return None
    from tuning.attention import attention_key, make_prefill_kernel, ragged_prefill_args, reference_causal_attention

    from tuning.graph_timer import tvm_graph_us

    from .peers import sdpa_us

    cfg, n = s.config, bucket
    key = attention_key(cfg, s.dtype)
    flops = 2.0 * cfg.n_head * cfg.head_dim * n * (n + 1)  # causal QK^T and PV
    row = _new_row(name="batch_prefill_ragged_kv", kind="attention",
                   shape=f"1x{n}x{cfg.n_head}x{cfg.head_dim} causal", phase="prefill", bucket=n,
                   weight=cfg.n_layer, flops=flops, nbytes=4 * n * cfg.n_embd * np.dtype(s.dtype).itemsize)
    row["untuned_from"] = "TVM's KV-cache template"
    tdev = s.device.tvm_device()
    try:
        tuned_cfg = stored_prefill_config(attention, key)
        args, q, k, v, sm_scale = ragged_prefill_args(key, n, device=tdev, seed=s.seed)
        scalars = (1, 0, 1.0, 1.0, sm_scale)  # causal, no rotary, rope scale/theta, softmax scale
        ref = reference_causal_attention(q, k, v, sm_scale)
        variants = [("untuned", None)] + ([("tuned", tuned_cfg)] if tuned_cfg is not None else [])
        for name, pc in variants:
            lib = _compile(make_prefill_kernel(pc, key, s.target), target=s.target)
            fn = lib["main"]
            fn(*args, *scalars)
            tdev.sync()
            err = float(np.abs(args[7].numpy().astype(np.float32) - ref).max()) / max(float(np.abs(ref).max()), 1e-6)
            if not err <= 2e-2:
                raise RuntimeError(f"{name} attention kernel differs from NumPy: rel err {err:.3g}")
            te = lib.time_evaluator("main", tdev, number=10, repeat=repeats)
            row["samples"][f"{name}_us"] = [float(x) * 1e6 for x in te(*args, *scalars).results]
            row[f"{name}_us"] = stats(row["samples"][f"{name}_us"]).median
            g = tvm_graph_us(fn, [*args, *scalars], device=s.device.name, repeats=max(repeats, 10))
            row[f"{name}_graph_us"] = stats(g).median
        row["tuned_record"] = tuned_cfg is not None
        if row["tuned_us"]:
            row["speedup"] = row["untuned_us"] / row["tuned_us"]
        sd = sdpa_us(batch=1, heads=cfg.n_head, seq_len=n, head_dim=cfg.head_dim, dtype=s.dtype,
                     device=s.device.name, repeats=max(repeats, 10))
        if sd:
            row["samples"]["sdpa_us"] = sd
            row["sdpa_us"] = stats(sd).median
        _peer_figures(row, row["sdpa_us"])
    except Exception as e:  # noqa: BLE001 - one broken row, not a crash
        row["status"], row["error"] = "error", first_line(e)
        log(f"attention: {first_line(e)}")
    return row


def run_kernels(cfg: BenchConfig, *, phase: str = "decode", batch: int = 8, seq_len: int = 1024,
                log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Time every kernel of one step at one bucket: untuned, tuned, cuBLAS (and SDPA for prefill attention).

    Parameters
    ----------
    cfg : BenchConfig
        Model, device, database, repeats (each kernel: ``repeats`` timed repeats of at least a
        few ms of back-to-back calls), seed, peaks. ``variants``, ``warmup``, ``cuda_graph`` and
        ``cache_dir`` do not apply (kernels are compiled and timed one by one).
    phase : str
        ``decode`` (bucket = ``batch``) or ``prefill`` (bucket = ``seq_len``, a chunk length of
        at most the model's ``prefill_chunk_size``).
    batch, seq_len : int
        The bucket.
    log : callable
        Progress messages.

    Returns
    -------
    dict
        Result document with ``command: "kernels"`` (row schema in ``bench/SCHEMA.md``).
    """
    if phase not in ("decode", "prefill"):
        raise BenchError(f"--phase must be decode or prefill, got {phase!r}")
    dev, arch, target, config, label, quantization, scheme = resolve_target(cfg)
    bucket = int(batch if phase == "decode" else seq_len)
    if bucket < 1:
        raise BenchError("--batch and --seq-len must be positive")
    if phase == "prefill" and bucket > config.prefill_chunk_size:
        raise BenchError(f"--seq-len {bucket}: prefill runs in chunks of at most {config.prefill_chunk_size} tokens "
                         f"for {label}; the kernels of a chunk are what a --seq-len <= {config.prefill_chunk_size} "
                         "shows")
    if phase == "decode" and bucket > config.max_batch_size:
        raise BenchError(f"--batch {bucket} exceeds the max batch size {config.max_batch_size}")
    notes: list[str] = []
    db_info, msg = locate_database(database_dir=cfg.database_dir, model=label, quantization=quantization,
                                 target=target, explicit=cfg.database, model_hash=config.model_hash())
    db = None
    if db_info is None:
        notes.append(msg)
        log(msg)
    else:
        db = db_info.db.ms  # the records, for MetaSchedule's queries
        log(f"tuned kernels from {db_info.path} (hash {db_info.hash[:12]})")
        have = db_info.db.buckets.get(phase) if db_info.db.buckets else None
        if have is not None and bucket not in have:
            notes.append(f"the database has no {phase} bucket {bucket} (it has {have}): the tuned build runs "
                         "the untuned kernels at this shape; the tuned column shows what its records give "
                         "for the static kernel")
        templated = _template_kernels(db_info.path, phase=phase, bucket=bucket)
        if templated:
            notes.append(f"norm_gemv.json replaces kernels of this bucket in the tuned build ({', '.join(templated)}: "
                         "a layer norm + its linear layer, or a c_proj layer + residual, as one template kernel; "
                         "its time and the replaced kernels' are in the file): the rows above are the partition's "
                         "kernels, not all of which the tuned build runs")
    env, peak = env_and_peak(dev, database=db_info.to_dict() if db_info else None, arch=arch,
                             dtype=scheme.activation_dtype, peak_bw=cfg.peak_bw, peak_tflops=cfg.peak_tflops,
                             notes=notes)
    tdev = dev.tvm_device()
    t0 = time.perf_counter()
    tasks, prepared = bucket_tasks(config, quantization=quantization, target=target, phase=phase, bucket=bucket)
    untuned_us = db_info.db.untuned_us if db_info else {}
    log(f"bench kernels: {label} {quantization} {phase} {'b' if phase == 'decode' else 's'}{bucket} on {dev.name} "
        f"({arch}): {len(tasks)} kernels, partitioned in {time.perf_counter() - t0:.1f} s")
    repeats, seed = cfg.repeats, cfg.seed
    min_ms = 10 if dev.kind == "cuda" else 1
    l2 = None
    if dev.kind == "cuda":
        try:
            l2 = int(tdev.l2_cache_size_bytes)
        except Exception:
            l2 = None
    rows = []
    for i, task in enumerate(tasks):
        row = _new_row(name=task.kernel, kind=task.kind, shape=_shape_str(task.func), phase=phase, bucket=bucket,
                       weight=task.weight, flops=task.flops, nbytes=task.bytes)
        try:
            args = random_args(task.func, device=tdev, seed=seed + i)
            row["untuned_from"] = f"symbolic:{task.twin_name}" if task.twin_name else "static"
            unt_lib = untuned_kernel(task, prepared=prepared, target=target)
            unt = time_kernel(unt_lib, args, device=tdev, repeats=repeats, min_repeat_ms=min_ms)
            row["samples"]["untuned_us"] = unt
            row["untuned_us"] = stats(unt).median
            graph_reps = max(repeats, 10)
            ug = _graph_or_note(unt_lib, args, dev.name, graph_reps, row)
            if ug:
                row["untuned_graph_us"] = stats(ug).median
            if db is not None:
                wg = wgmma_kernel(db_info.path, task, bucket=bucket, target=target, phase=phase)
                if wg is not None:  # the tuned build runs the wgmma template here, not the partition kernel
                    tun_lib, row["tuned_record"] = wg[0], True
                    row["notes"].append(f"tuned = {wg[1]} (wgmma_gemm.json), not the partition kernel")
                else:
                    tun_lib, row["tuned_record"] = tuned_kernel(task, prepared=prepared, database=db, target=target,
                                                                untuned_us=untuned_us)
                # llm.c habit: check the tuned kernel against the untuned one before timing it
                err = compare_outputs(unt_lib, tun_lib, task.func, device=tdev, seed=seed + i)
                rtol = KERNEL_RTOL.get(scheme.activation_dtype, 2e-2)
                if not err <= rtol:
                    raise RuntimeError(f"tuned kernel output differs from untuned: rel err {err:.3g} > {rtol:.0e}")
                row["notes"].append(f"tuned output matches untuned (rel err {err:.1e})")
                tun = time_kernel(tun_lib, args, device=tdev, repeats=repeats, min_repeat_ms=min_ms)
                row["samples"]["tuned_us"] = tun
                row["tuned_us"] = stats(tun).median
                row["speedup"] = row["untuned_us"] / row["tuned_us"]
                tg = _graph_or_note(tun_lib, args, dev.name, graph_reps, row)
                if tg:
                    row["tuned_graph_us"] = stats(tg).median
            if task.kind in ("gemm", "gemv"):
                mnk = _mnk(task.func)
                if mnk is not None:
                    from .peers import cublas_matmul_us

                    m, n, k, dt = mnk
                    cub = cublas_matmul_us(m=m, n=n, k=k, dtype=dt, device=dev.name, repeats=max(repeats, 10))
                    if cub:
                        row["samples"]["cublas_us"] = cub
                        row["cublas_us"] = stats(cub).median
            _peer_figures(row, row["cublas_us"])
            best = row["tuned_us"] or row["untuned_us"]
            if task.kind == "gemm":
                row["achieved"], row["achieved_value"] = "TFLOP/s", task.flops / (best * 1e-6) / 1e12
                row["pct_peak"] = pct(row["achieved_value"], peak.tflops if peak else None)
            else:
                row["achieved"], row["achieved_value"] = "GB/s", task.bytes / (best * 1e-6) / 1e9
                row["pct_peak"] = pct(row["achieved_value"], peak.mem_gb_s if peak else None)
                if l2 and task.bytes < l2:
                    row["notes"].append("working set fits in L2: GB/s may exceed DRAM bandwidth")
        except Exception as e:  # noqa: BLE001 - one broken kernel is a row, not a crash
            row["status"], row["error"] = "error", first_line(e)
            log(f"{task.kernel}: {first_line(e)}")
        rows.append(row)
        if row["status"] == "ok":
            log(f"{task.kernel:>44} x{task.weight}: untuned {row['untuned_us']:9.2f} us"
                + (f"  tuned {row['tuned_us']:9.2f} us" if row["tuned_us"] else "")
                + (f"  graph: untuned {row['untuned_graph_us']:8.2f}" if row["untuned_graph_us"] else "")
                + (f" tuned {row['tuned_graph_us']:8.2f}" if row["tuned_graph_us"] else "")
                + (f"  cuBLAS {row['cublas_us']:8.2f} us" if row["cublas_us"] else ""))
    if phase == "prefill":
        import types

        s = types.SimpleNamespace(config=config, dtype=scheme.activation_dtype, device=dev, target=target, seed=seed)
        att = attention_row(s, bucket=bucket, attention=db_info.db.attention if db_info else None, repeats=repeats,
                            log=log)
        if att is not None:
            rows.append(att)
        else:
            notes.append("attention row (KV cache kernel vs torch SDPA) needs a CUDA device")
    for key, src in (("share", "untuned_us"), ("share_tuned", "tuned_us")):
        total = sum(r["weight"] * r[src] for r in rows if r["status"] == "ok" and r[src])
        for r in rows:
            if r["status"] == "ok" and r[src] and total:
                r[key] = r["weight"] * r[src] / total
    if dev.kind == "cpu":
        notes.append("cuBLAS/SDPA and CUDA-graph columns need a CUDA device: not shown")
    if phase == "decode":
        notes.append("attention runs inside the KV cache's own kernels and is not part of the partition")
    args_doc = dict(cfg.to_dict(), quantization=quantization, phase=phase, batch=batch, seq_len=seq_len,
                    bucket=bucket)
    return make_result(command="kernels", args=args_doc, env=env, peak=peak_to_dict(peak),
                       timer="tvm-time_evaluator", rows=rows, notes=notes)
