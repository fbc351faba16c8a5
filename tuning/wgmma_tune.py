"""The Hopper wgmma GEMM search (:mod:`gpt2_model.wgmma_gemm`), stored in ``wgmma_gemm.json`` (issue 13 item 2).

For every prefill chunk bucket, and every decode batch bucket of 16 rows or more (the skinny GEMMs of
issue 11 item 4; those the fused norm + GEMV kernels run with their layer norm are left out), the four
GEMMs of a layer (QKV + bias, attention c_proj + bias + residual, ``c_fc`` + bias + GELU, MLP c_proj +
bias + residual) get the template's candidate constants (:data:`CANDIDATES`, plus
:data:`DECODE_CANDIDATES` for decode batches: tile M/N/K, pipeline stages, consumer warpgroups,
producer warp specialization, split-K) built in parallel for ``sm_90a``, each checked on the local GPU
against NumPy (the output poisoned with NaN first) and timed (:func:`tuning.graph_timer.kernel_us`:
CUDA-graph replays where torch has CUDA; decode batches cold). The kernel it would replace is timed the
same way: the partition kernel scheduled as the tuned build schedules it (the database's record, else
dlight), or the norm + GEMV template's plain kernel where the database runs the GEMM there
(:func:`plain_elsewhere`); the fastest checked candidate is stored only when it beats that kernel. A
candidate that fails to build or to check is logged and never stored.

At compile time :func:`gemm_plan_for` turns the file into the
:class:`~gpt2_model.wgmma_plan.GemmPlan` the exported model uses for those prefill shapes
(:func:`tuning.compile.build_model`); other arches, and databases without the file, build without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gpt2_model.wgmma_build import install_compile_hook
from gpt2_model.wgmma_gemm import SM90A, GemmConfig, GemmKey, config_problem, make_gemm, parse_config
from gpt2_model.wgmma_plan import GemmPlan

from .attention import AttentionError, _build_all
from .dbfiles import WGMMA_GEMM_FILE, read_json
from .norm_gemv_tune import (_time_kernel, as_tuned_build_runs, check_and_time, merge_winners, parse_template_entry,
                             read_plan)
from .targets import arch_of, is_gpu

__all__ = ["CANDIDATES", "DECODE_CANDIDATES", "MIN_DECODE_ROWS", "WGMMA_SCHEMA", "fused_elsewhere", "gemm_candidates",
           "gemm_keys", "gemm_plan_for", "parse_gemm_entry", "plain_elsewhere", "read_gemm_plan", "reference_gemm",
           "tune_wgmma_gemm", "wgmma_arch"]

WGMMA_SCHEMA = "gpt2k-wgmma-gemm/1"
#: |out - ref| <= ATOL + RTOL * |ref| (fp16 output; fp32 sums over K <= 3072 in another order)
ATOL, RTOL = 2e-3, 1e-2


#: The constants searched per key (:func:`gemm_candidates`): the configurations measured on an H100
#: (2026-12-07), smaller tiles for short chunks, and tiles whose CTA count fills the card's 132 SMs
#: in one wave (1024 x 2304 in 128 x 144 tiles, 1024 x 768 in 64 x 96, 512 x 2304 in 64 x 144: 128
#: CTAs each), and split-K tiles for the K = 3072 / 768 GEMMs of short chunks (128 x 768 x 3072 in
#: 64 x 96 tiles: 16 CTAs, 64 with 4 splits). Written
#: ``{tile_m}x{tile_n}x{tile_k}s{stages}c{consumers}{ws|nows}[k{split}]``.
CANDIDATES = ("128x128x64s4c2ws", "128x192x64s4c2ws", "128x256x64s4c2ws", "128x128x64s4c2nows",
              "64x128x64s5c1ws", "128x64x64s6c2ws", "64x64x64s6c1nows", "64x64x64s8c1ws",
              "64x192x64s4c1ws", "64x256x64s4c1ws", "128x96x64s5c2ws", "128x144x64s5c2ws",
              "64x144x64s6c1ws", "64x96x64s6c1ws", "64x48x64s8c1ws", "64x72x64s8c1ws",
              "64x96x64s4c1wsk2", "64x96x64s4c1wsk4", "64x128x64s4c1wsk4", "64x128x64s4c1wsk8",
              "64x64x64s4c1nowsk4")


#: Added for decode batches (``rows`` keys: one 64-row tile, a weight-bound GEMM): narrow tiles split
#: over K, so that the weights stream through more CTAs (b32 768 x 3072: 64 x 48 tiles are 16 CTAs,
#: 64 x 16 split 8 ways 384; 768 x 768 in 64 x 16 split 4 ways: 192).
DECODE_CANDIDATES = ("64x16x64s4c1wsk4", "64x16x64s6c1wsk8", "64x24x64s6c1wsk8", "64x32x64s4c1wsk2",
                     "64x32x64s4c1wsk4", "64x32x64s6c1wsk8", "64x48x64s4c1wsk2", "64x48x64s4c1wsk4",
                     "64x64x64s4c1wsk2", "64x64x64s4c1wsk4", "64x64x64s6c1wsk8")


def gemm_candidates(key: GemmKey) -> list[GemmConfig]:
    """Every legal configuration of :data:`CANDIDATES` (and, for a decode batch, :data:`DECODE_CANDIDATES`)
    for ``key``."""
    names = CANDIDATES + (DECODE_CANDIDATES if key.rows else ())
    cands = [c for c in map(parse_config, names) if config_problem(key, c) is None]
    if key.rows and key.m <= 64:  # (one 64-row tile holds the batch: 128-row tiles only compute padding)
        cands = [c for c in cands if c.tile_m == 64]
    return cands


def wgmma_arch(target) -> bool:
    """Whether builds for ``target`` can use the kernel (CUDA sm_90: H100/H200)."""
    return is_gpu(target) and arch_of(target) == "sm_90"


#: Decode batches below this stay on the GEMV kernels (a wgmma tile has 64 rows).
MIN_DECODE_ROWS = 16


def gemm_keys(config, *, dtype: str, lengths: Sequence[int] = (), batches: Sequence[int] = ()) -> list[GemmKey]:
    """The four layer GEMMs the kernel can take (fp16): of a prefill chunk of each length that tiles by
    64 rows, and of a decode batch of each bucket from :data:`MIN_DECODE_ROWS` rows (``rows=True``: the
    last 64-row tile partly empty)."""
    if dtype != "float16":
        return []
    d, inner = config.n_embd, config.n_inner
    gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
    keys = []
    shapes = [(int(s), False) for s in sorted({int(x) for x in lengths}) if int(s) % 64 == 0]
    shapes += [(int(b), True) for b in sorted({int(x) for x in batches}) if int(b) >= MIN_DECODE_ROWS]
    for m, rows in shapes:
        keys.append(GemmKey(m, 3 * d, d, "bias", rows=rows))
        keys.append(GemmKey(m, d, d, "bias_residual", rows=rows))
        if gelu:
            keys.append(GemmKey(m, inner, d, "bias_gelu", rows=rows))
        keys.append(GemmKey(m, d, inner, "bias_residual", rows=rows))
    return [k for k in keys if gemm_candidates(k)]


def _norm_gemv_key(key: GemmKey, prologue: str):
    from gpt2_model.norm_gemv import NormGemvKey  # pylint: disable=import-outside-toplevel

    return NormGemvKey(batch=key.m, k=key.k, n=key.n, epilogue=key.epilogue, dtype=key.dtype, out_dtype=key.dtype,
                       prologue=prologue)


def fused_elsewhere(key: GemmKey, norm_gemv_plan) -> bool:
    """Whether the build runs this decode GEMM with its layer norm fused in (the norm + GEMV template's
    ``norm`` form): the wgmma kernel would need the norm as a kernel of its own, so it is not searched.
    A decode GEMM the template runs in its plain form (no norm) is searched, against that kernel
    (:func:`plain_elsewhere`), and the model takes the wgmma kernel where it was stored."""
    if not key.rows or norm_gemv_plan is None:
        return False
    return norm_gemv_plan.config_for(_norm_gemv_key(key, "norm")) is not None


def plain_elsewhere(key: GemmKey, norm_gemv_plan):
    """``(NormGemvKey, NormGemvConfig)`` of the norm + GEMV template's plain kernel that runs this decode
    GEMM in the build now, or None: the kernel a wgmma candidate must beat to be stored."""
    if not key.rows or norm_gemv_plan is None:
        return None
    nkey = _norm_gemv_key(key, "none")
    cfg = norm_gemv_plan.config_for(nkey)
    return (nkey, cfg) if cfg is not None else None


def reference_gemm(key: GemmKey, a, w, bias, residual=None) -> np.ndarray:
    """NumPy: fp32 products and sum, the epilogue, one cast."""
    y = a.reshape(key.m, key.k).astype(np.float32) @ w.astype(np.float32).T + bias.astype(np.float32)
    if key.epilogue == "bias_gelu":
        y = 0.5 * y * (1 + np.tanh(0.7978845608028654 * (y + 0.044715 * y**3)))
    if key.epilogue == "bias_residual":
        y = y + residual.reshape(key.m, key.n).astype(np.float32)
    return y.astype(key.dtype).reshape(key.shape_out())


def _inputs(key: GemmKey, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal(key.shape_in()).astype(key.dtype),
            "w": (rng.standard_normal((key.n, key.k)) / np.sqrt(key.k)).astype(key.dtype),
            "bias": (0.1 * rng.standard_normal(key.n)).astype(key.dtype),
            "residual": rng.standard_normal(key.shape_out()).astype(key.dtype)}


def _build_one(job: tuple) -> tuple[str | None, str | None]:
    """(library path, None) or (None, error) for one (key, config) candidate; runs in a worker process."""
    key_d, cfg_d, path = job
    try:
        import tvm  # pylint: disable=import-outside-toplevel

        install_compile_hook()
        func = make_gemm(GemmKey(**key_d), GemmConfig(**cfg_d), name="main")
        target = tvm.target.Target(SM90A)
        with target:
            exe = tvm.compile(tvm.IRModule({"main": func}), target=target, tir_pipeline="tirx")
        exe.export_library(path)
        return path, None
    except Exception as err:  # noqa: BLE001 - a candidate that fails to build is skipped, with its reason
        return None, f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"


def _build_candidates(jobs: list[tuple[GemmKey, GemmConfig]], folder: Path, workers: int | None) -> list:
    args = [(asdict(k), asdict(c), str(folder / f"{k.name()}__{c.label()}.so")) for k, c in jobs]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_build_one, args))


def _replaced_kernels(config, *, quantization: str, target, db_dir: Path, keys: Sequence[GemmKey],
                      norm_gemv_plan=None) -> dict:
    """Per key name: ``[(what, PrimFunc)]``, the kernel the build runs for that GEMM now: the norm + GEMV
    template's plain kernel where ``norm_gemv_plan`` names it (decode keys, :func:`plain_elsewhere`), else
    the bucket's partition kernel of that GEMM (epilogue fused; the prefill chunk's, or the decode batch's
    for ``rows`` keys), scheduled as the tuned build schedules it."""
    from .database import TunedDatabase  # pylint: disable=import-outside-toplevel
    from .partition import partition  # pylint: disable=import-outside-toplevel

    out = {}
    for key in keys:
        plain = plain_elsewhere(key, norm_gemv_plan)
        if plain is not None:
            nkey, cfg = plain
            out[key.name()] = [(f"gemv {nkey.name()} ({cfg.label()})",
                                norm_gemv_plan.make(nkey, cfg, eps=float(config.layer_norm_epsilon), name="main"))]
    keys = [k for k in keys if k.name() not in out]
    if not keys:
        return out
    buckets = {"prefill": sorted({k.m for k in keys if not k.rows}), "decode": sorted({k.m for k in keys if k.rows})}
    tasks = partition(config, quantization=quantization, target=target, buckets={p: v for p, v in buckets.items() if v})
    db = TunedDatabase.open(db_dir, target=target).ms if (db_dir / "meta.json").is_file() else None
    for key in keys:
        phase = "decode" if key.rows else "prefill"
        task = next((t for t in tasks if t.phase == phase and t.bucket == key.m and t.kind in ("gemm", "gemv")
                     and (key.n, key.k) in t.shapes() and key.shape_out() in t.shapes()), None)
        if task is None:
            continue
        got = as_tuned_build_runs(task, db, target)
        if got is not None:
            out[key.name()] = [(f"linear {got[0]}", got[1])]
    return out


def _check_and_time(lib, key: GemmKey, inp: dict, ref: np.ndarray, *, device, number: int, repeat: int) -> dict:
    names = ("a", "w", "bias") + (("residual",) if key.epilogue == "bias_residual" else ())
    return check_and_time(lib, [inp[n] for n in names], ref, device=device, number=number, repeat=repeat,
                          atol=ATOL, rtol=RTOL, cold=key.rows)


def tune_wgmma_gemm(config, *, dtype: str, target, out_dir: str | os.PathLike, lengths: Sequence[int] = (),
                    batches: Sequence[int] = (), quantization: str = "q0f16", device=None, workers: int | None = None,
                    number: int = 100, repeat: int = 5, log: Callable[[str], None] = print) -> dict:
    """Search the wgmma GEMMs of the prefill chunk ``lengths`` and of the decode ``batches`` (from
    :data:`MIN_DECODE_ROWS`; those the database's fused norm + GEMV kernels run with their layer norm are
    left out) on the local GPU (sm_90); merge the winners (checked, and faster than the kernel they
    replace: the partition kernel, or the norm + GEMV template's plain kernel where the database runs
    that GEMM in it) into ``out_dir/wgmma_gemm.json``. Returns the file's content."""
    import tempfile  # pylint: disable=import-outside-toplevel

    import tvm  # pylint: disable=import-outside-toplevel

    device = device or tvm.cuda(0)
    if not device.exist:
        raise AttentionError("the wgmma GEMM search measures on a local CUDA GPU, and this machine has none")
    if device.compute_version != "9.0":
        raise AttentionError(f"the wgmma GEMM needs an sm_90 GPU (H100/H200); this one is {device.compute_version}")
    out = Path(out_dir)
    from .norm_gemv_tune import read_norm_gemv_plan  # pylint: disable=import-outside-toplevel

    fused = read_norm_gemv_plan(out)
    keys = [k for k in gemm_keys(config, dtype=dtype, lengths=lengths, batches=batches) if not fused_elsewhere(k, fused)]
    if not keys:
        log(f"wgmma: no GEMM the kernel takes at chunk lengths {list(lengths)} / decode batches {list(batches)} "
            f"({dtype}; decode GEMMs the fused norm + GEMV kernels run are left out)")
        return read_json(out / WGMMA_GEMM_FILE, {}) or {}
    t0 = time.time()
    jobs = [(k, c) for k in keys for c in gemm_candidates(k)]
    replaced = _replaced_kernels(config, quantization=quantization, target=target, db_dir=out, keys=keys,
                                 norm_gemv_plan=fused)
    base_funcs = [(name, what, f) for name, pair in replaced.items() for what, f in pair]
    decode_names = {k.name() for k in keys if k.rows}  # (timed cold: a decode step reads each weight once)
    log(f"wgmma: {len(jobs)} candidates for {len(keys)} GEMMs at chunk lengths "
        f"{sorted({k.m for k in keys if not k.rows})}, decode batches {sorted({k.m for k in keys if k.rows})} "
        f"(+ {len(base_funcs)} partition kernels to beat); building...")
    with tempfile.TemporaryDirectory(prefix="wgmma_") as tmp:
        built = _build_candidates(jobs, Path(tmp), workers)
        base_paths, errors = _build_all([f for _, _, f in base_funcs], target, workers=workers)
        base_us: dict[str, dict] = {}
        for (name, what, f), path in zip(base_funcs, base_paths):
            base_us.setdefault(name, {})[what] = _time_kernel(
                tvm.runtime.load_module(path), f, device=device, number=number, repeat=repeat,
                cold=name in decode_names) if path else None
        failed = [e for _, e in built if e]
        log(f"wgmma: built {len(jobs) - len(failed)}/{len(jobs)} in {time.time() - t0:.0f} s; measuring")
        if failed:
            log(f"wgmma: {len(failed)} failed to build; first error: {failed[0]}")
        if errors:
            log(f"wgmma: {len(errors)} partition kernels failed to build; first: {errors[0].strip().splitlines()[-1]}")
        found: dict[str, dict] = {}
        refs = {}
        for (key, cfg), (path, err) in zip(jobs, built):
            entry = found.setdefault(key.name(), {"key": asdict(key), "candidates": []})
            if path is None:
                entry["candidates"].append({"config": asdict(cfg), "error": err or "build failed"})
                continue
            if key not in refs:
                inp = _inputs(key)
                refs[key] = (inp, reference_gemm(key, inp["a"], inp["w"], inp["bias"], inp["residual"]))
            inp, ref = refs[key]
            res = _check_and_time(tvm.runtime.load_module(path), key, inp, ref, device=device, number=number,
                                  repeat=repeat)
            entry["candidates"].append({"config": asdict(cfg), **res})
    doc = read_json(out / WGMMA_GEMM_FILE, {}) or {}
    kernels = merge_winners(dict(doc.get("kernels") or {}), found, base_us, log=log, what="wgmma",
                            label=lambda c: GemmConfig(**c).label())
    doc = {"schema": WGMMA_SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "device": getattr(device, "device_name", None), "kernels": kernels}
    out.mkdir(parents=True, exist_ok=True)
    tmp_file = out / (WGMMA_GEMM_FILE + ".tmp")
    tmp_file.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_file, out / WGMMA_GEMM_FILE)
    log(f"wgmma: {len(found)} GEMMs searched in {time.time() - t0:.0f} s; {len(kernels)} stored in "
        f"{out / WGMMA_GEMM_FILE}")
    return doc


def parse_gemm_entry(name: str, entry: dict) -> tuple[GemmKey | None, GemmConfig]:
    """``(key, config)`` of a ``wgmma_gemm.json`` entry.

    Raises
    ------
    ValueError
        The entry is malformed, holds another name's key, or its constants cannot make its kernel.
    """
    return parse_template_entry(name, entry, config_cls=GemmConfig, key_cls=GemmKey, problem=config_problem)


def read_gemm_plan(db_dir: str | os.PathLike | None) -> GemmPlan | None:
    """The plan of a database's ``wgmma_gemm.json`` (None: no file, or nothing stored); a malformed or
    illegal entry is skipped with a warning (that GEMM keeps its partition kernel)."""
    return read_plan(db_dir, file=WGMMA_GEMM_FILE, parse=parse_gemm_entry, make_plan=GemmPlan)


def gemm_plan_for(db_dir: str | os.PathLike | None, target) -> GemmPlan | None:
    """The plan a build for ``target`` with the database at ``db_dir`` uses (sm_90 CUDA targets only); with
    programmatic dependent launch on (``GPT2K_PDL``) its kernels prefetch their weights before the wait."""
    from .pdl import pdl_enabled  # pylint: disable=import-outside-toplevel

    plan = read_gemm_plan(db_dir) if db_dir is not None and wgmma_arch(target) else None
    return dataclasses.replace(plan, prefetch_w=True) if plan is not None and pdl_enabled(target) else plan
