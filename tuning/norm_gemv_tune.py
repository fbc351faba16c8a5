"""The fused layer norm + decode GEMV search (:mod:`gpt2_model.norm_gemv`), stored in ``norm_gemv.json``.

For every decode batch bucket, the three norm + linear pairs of a step (``ln_1`` + QKV, ``ln_2`` +
``c_fc`` + GELU, ``ln_f`` + the tied lm_head) get their template's candidates built in parallel,
each checked on the local GPU against a NumPy reference (the output poisoned with NaN first, so a
kernel that skips a column fails) and timed with ``time_evaluator``. The pair the fused kernel
replaces is timed the same way: the bucket's layer-norm kernel (dlight) plus its GEMM/GEMV kernel
as the tuned build runs it (the database's record, else dlight). The fastest checked candidate is
stored only when it beats that pair; otherwise the build keeps the two kernels. (On an H200,
2026-12-02, the CUDA-core form fused everywhere made a whole decode step 0.263 vs 0.285 ms at b1,
0.395 vs 0.397 at b8 and 0.840 vs 0.522 at b32: from 8 rows the GEMMs run on tensor cores, hence
the tensor-core form and this comparison.)

At compile time :func:`read_norm_gemv_plan` turns the file into the
:class:`~gpt2_model.norm_gemv_plan.NormGemvPlan` the exported model fuses with
(:func:`tuning.compile.build_model`); a database without the file builds the unfused model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gpt2_model.norm_gemv import (NormGemvConfig, NormGemvError, NormGemvKey, make_norm_gemv,
                                  norm_gemv_candidates, norm_gemv_problem)
from gpt2_model.norm_gemv_plan import NormGemvPlan

from .attention import AttentionError, _build_all
from .attention_build import make_candidates
from .dbfiles import NORM_GEMV_FILE, read_json
from .graph_timer import kernel_us
from .targets import cuda_sm_at_least, is_gpu

__all__ = ["NORM_GEMV_SCHEMA", "merge_winners", "norm_gemv_keys", "norm_gemv_plan_for", "parse_entry", "read_norm_gemv_plan", "reference_norm_gemv", "tune_norm_gemv"]

logger = logging.getLogger(__name__)

NORM_GEMV_SCHEMA = "gpt2k-norm-gemv/1"
#: Allowed error of a candidate against the NumPy reference: |out - ref| <= ATOL + RTOL * |ref|
#: (fp16 outputs round to 2^-11 relative; the fp32 lm_head sums 768 products in another order).
ATOL, RTOL = 2e-3, 1e-2
#: From this batch on the search also tries the plain lm_head: the fused form normalizes the batch
#: rows again in each of its ~800 blocks, which at 32 rows cost 3x the weight traffic (H100, 2026-12-07).
PLAIN_LM_HEAD_FROM = 8
#: ... and the plain QKV and c_fc layers (after ln_1 / ln_2 alone) from this batch.
PLAIN_LINEAR_FROM = 16


def norm_gemv_keys(config, *, dtype: str, batches: Sequence[int]) -> list[NormGemvKey]:
    """The kernels of a decode step the templates can take, at each batch (those they support): the
    norm + linear pairs, the two c_proj layers with their residual add (plain prologue), and from
    :data:`PLAIN_LM_HEAD_FROM` (:data:`PLAIN_LINEAR_FROM`) rows the plain lm_head (QKV, c_fc) after
    a standalone layer norm, the fused pair's rival: the search keeps the faster (:func:`pick_plain`)."""
    keys = []
    gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
    d = config.n_embd
    for b in sorted({int(x) for x in batches}):
        keys.append(NormGemvKey(b, d, 3 * d, "bias", dtype, dtype))
        if gelu:
            keys.append(NormGemvKey(b, d, config.n_inner, "bias_gelu", dtype, dtype))
        keys.append(NormGemvKey(b, d, config.vocab_size, "none", dtype, "float32"))
        keys.append(NormGemvKey(b, d, d, "bias_residual", dtype, dtype, prologue="none"))  # attn.c_proj
        keys.append(NormGemvKey(b, config.n_inner, d, "bias_residual", dtype, dtype, prologue="none"))  # mlp.c_proj
        if b >= PLAIN_LM_HEAD_FROM:
            keys.append(NormGemvKey(b, d, config.vocab_size, "none", dtype, "float32", prologue="none"))
        if b >= PLAIN_LINEAR_FROM:  # the layer's own norm + linear pairs, plain after a standalone norm
            keys.append(NormGemvKey(b, d, 3 * d, "bias", dtype, dtype, prologue="none"))
            if gelu:
                keys.append(NormGemvKey(b, d, config.n_inner, "bias_gelu", dtype, dtype, prologue="none"))
    return [k for k in keys if norm_gemv_candidates(k)]


def reference_norm_gemv(key: NormGemvKey, x, gamma, beta, w, bias, *, eps: float, residual=None) -> np.ndarray:
    """NumPy: layer norm in fp32 rounded to the activation dtype (with the norm prologue), fp32 dot
    products, epilogue, cast."""
    xf = x[:, 0].astype(np.float32)
    if key.prologue == "norm":
        mu = xf.mean(-1, keepdims=True)
        var = ((xf - mu) ** 2).mean(-1, keepdims=True)
        xf = ((xf - mu) / np.sqrt(var + eps) * gamma.astype(np.float32) + beta.astype(np.float32)).astype(key.dtype)
    y = xf.astype(np.float32) @ w.astype(np.float32).T
    if key.epilogue != "none":
        y = y + bias.astype(np.float32)
    if key.epilogue == "bias_residual":
        y = y + residual[:, 0].astype(np.float32)
    if key.epilogue == "bias_gelu":
        y = 0.5 * y * (1 + np.tanh(0.7978845608028654 * (y + 0.044715 * y**3)))
    return y.astype(key.out_dtype)[:, None]


def _inputs(key: NormGemvKey, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": (rng.standard_normal((key.batch, 1, key.k)) * 2 + 0.3).astype(key.dtype),
        "gamma": (1 + 0.1 * rng.standard_normal(key.k)).astype(key.dtype),
        "beta": (0.1 * rng.standard_normal(key.k)).astype(key.dtype),
        "w": (rng.standard_normal((key.n, key.k)) / np.sqrt(key.k)).astype(key.dtype),
        "bias": (0.1 * rng.standard_normal(key.n)).astype(key.dtype),
        "residual": rng.standard_normal((key.batch, 1, key.n)).astype(key.dtype),
    }


def _arg_names(key: NormGemvKey) -> tuple[str, ...]:
    """The kernel's inputs in order (its output follows)."""
    if key.prologue == "none":
        return ("x", "w") + (("bias",) if key.epilogue != "none" else ()) + (
            ("residual",) if key.epilogue == "bias_residual" else ())
    return ("x", "gamma", "beta", "w") + (("bias",) if key.epilogue != "none" else ())


def _check_and_time(lib, key: NormGemvKey, inp: dict, ref: np.ndarray, *, device, number: int, repeat: int) -> dict:
    return check_and_time(lib, [inp[n] for n in _arg_names(key)], ref, device=device, number=number, repeat=repeat,
                          cold=True)


def check_and_time(lib, inputs: list, ref: np.ndarray, *, device, number: int, repeat: int,
                   atol: float = ATOL, rtol: float = RTOL, cold: bool = False) -> dict:
    """Run a template candidate's ``main`` on ``inputs`` (host arrays) into an output poisoned with
    NaN and compare with ``ref`` (its shape and dtype): ``ok`` when every value is finite and
    ``|out - ref| <= atol + rtol * |ref|``; a passing candidate is timed (``us``: :func:`kernel_us`; with
    ``cold`` its inputs are not left in L2 between calls, as in a decode step)."""
    import tvm  # pylint: disable=import-outside-toplevel

    args = [tvm.runtime.tensor(a, device) for a in inputs]
    out = tvm.runtime.tensor(np.full(ref.shape, np.nan, ref.dtype), device)
    lib["main"](*args, out)
    device.sync()
    got = out.numpy().astype(np.float32)
    want = ref.astype(np.float32)
    err = float(np.max(np.abs(got - want) - rtol * np.abs(want))) if got.size else 0.0
    res = {"ok": bool(np.all(np.isfinite(got))) and err <= atol, "excess_err": err}
    if res["ok"]:
        res["us"] = kernel_us(lib, [*args, out], device=device, number=number, repeat=repeat, cold=cold)[0]
    return res


def _unfused_kernels(config, *, quantization: str, target, db_dir: Path, keys: Sequence[NormGemvKey]) -> dict:
    """Per key name: ``[(what, PrimFunc), ...]`` of the kernels the template's one replaces -- the
    bucket's layer norm (norm prologue) and its linear kernel -- scheduled as the tuned build
    schedules them (the database's record, else dlight)."""
    from .database import TunedDatabase  # pylint: disable=import-outside-toplevel
    from .partition import partition  # pylint: disable=import-outside-toplevel

    tasks = partition(config, quantization=quantization, target=target,
                      buckets={"decode": sorted({k.batch for k in keys})})
    db = TunedDatabase.open(db_dir, target=target).ms if (db_dir / "meta.json").is_file() else None
    out = {}
    for key in keys:
        mine = [t for t in tasks if t.phase == "decode" and t.bucket == key.batch]
        norm = next((t for t in mine if t.kernel.startswith("layer_norm")
                     and (key.batch, 1, key.k) in t.shapes()), None)
        gemm = next((t for t in mine if t.kind in ("gemv", "gemm") and (key.n, key.k) in t.shapes()
                     and (key.batch, 1, key.n) in t.shapes()), None)
        if gemm is None or (norm is None and key.prologue == "norm"):
            continue
        funcs = []
        for what, task in ((("norm", norm),) if key.prologue == "norm" else ()) + (("linear", gemm),):
            got = as_tuned_build_runs(task, db, target)
            if got is None:
                break
            funcs.append((f"{what} {got[0]}", got[1]))
        if len(funcs) == (2 if key.prologue == "norm" else 1):
            out[key.name()] = funcs
    return out


def as_tuned_build_runs(task, db, target) -> tuple[str, object] | None:
    """``("<kernel> (tuned|dlight)", PrimFunc)``: a partition task scheduled as the tuned build
    schedules it (the MetaSchedule database ``db``'s record, else dlight); None if neither applies."""
    from tvm.s_tir import Schedule  # pylint: disable=import-outside-toplevel

    from .untuned import untuned_schedule  # pylint: disable=import-outside-toplevel

    rec = db.query_tuning_record(task.mod(), target, "main") if db is not None else None
    if rec is not None:
        sch = Schedule(task.mod())
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
    else:
        sch = untuned_schedule(task.mod(), target=target)
    if sch is None:
        return None
    return f"{task.kernel} " + ("(tuned)" if rec is not None else "(dlight)"), sch.mod["main"]


def _time_kernel(lib, func, *, device, number: int, repeat: int, cold: bool = True) -> float:
    import tvm  # pylint: disable=import-outside-toplevel

    from .verify import _random_args  # pylint: disable=import-outside-toplevel

    args = [tvm.runtime.tensor(a, device) for a in _random_args(func, np.random.default_rng(0))]
    return kernel_us(lib, args, device=device, number=number, repeat=repeat, cold=cold)[0]


def tune_norm_gemv(config, *, dtype: str, target, out_dir: str | os.PathLike, batches: Sequence[int],
                   quantization: str | None = None, device=None, workers: int | None = None, number: int = 100,
                   repeat: int = 5, log: Callable[[str], None] = print) -> dict:
    """Search every fused norm + GEMV pair of the decode ``batches`` on the local GPU; merge the
    winners (checked, and faster than the two kernels they replace) into ``out_dir/norm_gemv.json``.
    Returns the file's content."""
    import tvm  # pylint: disable=import-outside-toplevel

    device = device or tvm.cuda(0)
    if not device.exist:
        raise AttentionError("the fused norm + GEMV search measures on a local CUDA GPU, and this machine has none")
    eps = float(config.layer_norm_epsilon)
    keys = norm_gemv_keys(config, dtype=dtype, batches=batches)
    if not keys:
        log(f"norm+gemv: no supported pair at batches {list(batches)} ({dtype})")
        return read_json(Path(out_dir) / NORM_GEMV_FILE, {}) or {}
    t0 = time.time()
    jobs = []  # (key, cfg, func)
    clusters = (1, 2, 4) if cuda_sm_at_least(target, 90) else (1,)  # thread block clusters: sm_90+
    pairs = [(cfg, key) for key in keys for cfg in norm_gemv_candidates(key, clusters=clusters)]
    made = make_candidates(make_norm_gemv, pairs, expected=(NormGemvError,), workers=workers, eps=eps)
    jobs += [(pairs[i][1], pairs[i][0], func) for i, func in made]
    quantization = quantization or ("q0f16" if dtype == "float16" else "q0f32")
    unfused = _unfused_kernels(config, quantization=quantization, target=target, db_dir=Path(out_dir), keys=keys)
    base_funcs = [(name, what, f) for name, pair in unfused.items() for what, f in pair]
    log(f"norm+gemv: {len(jobs)} candidates for {len(keys)} pairs at batches {sorted(set(batches))} "
        f"(+ {len(base_funcs)} unfused kernels to beat); building...")
    paths, errors = _build_all([f for _, _, f in jobs] + [f for _, _, f in base_funcs], target, workers=workers)
    base_paths, paths = paths[len(jobs):], paths[:len(jobs)]
    base_us: dict[str, dict] = {}
    for (name, what, f), path in zip(base_funcs, base_paths):
        entry = base_us.setdefault(name, {})
        entry[what] = _time_kernel(tvm.runtime.load_module(path), f, device=device, number=number,
                                   repeat=repeat) if path is not None else None
    log(f"norm+gemv: built {sum(p is not None for p in paths)}/{len(paths)} in {time.time() - t0:.0f} s; measuring")
    if errors:
        log(f"norm+gemv: {len(errors)} failed to build; first error: {errors[0].strip().splitlines()[-1]}")
    refs = {}
    found: dict[str, dict] = {}
    for (key, cfg, _), path in zip(jobs, paths):
        entry = found.setdefault(key.name(), {"key": asdict(key), "candidates": []})
        if path is None:
            entry["candidates"].append({"config": asdict(cfg), "error": "build failed"})
            continue
        if key not in refs:
            inp = _inputs(key)
            refs[key] = (inp, reference_norm_gemv(key, inp["x"], inp["gamma"], inp["beta"], inp["w"], inp["bias"],
                                                  eps=eps, residual=inp["residual"]))
        inp, ref = refs[key]
        res = _check_and_time(tvm.runtime.load_module(path), key, inp, ref, device=device, number=number,
                              repeat=repeat)
        entry["candidates"].append({"config": asdict(cfg), **res})
    doc = read_json(Path(out_dir) / NORM_GEMV_FILE, {}) or {}
    kernels = pick_plain(merge_winners(dict(doc.get("kernels") or {}), found, base_us, log=log), log=log)
    doc = {"schema": NORM_GEMV_SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "device": getattr(device, "device_name", None), "eps": eps, "kernels": kernels}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (NORM_GEMV_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / NORM_GEMV_FILE)
    log(f"norm+gemv: {len(found)} pairs searched in {time.time() - t0:.0f} s; {len(kernels)} stored in {out / NORM_GEMV_FILE}")
    return doc


def merge_winners(kernels: dict, found: dict, base_us: dict, *, log: Callable[[str], None] = print,
                  what: str = "norm+gemv", label: Callable[[dict], str] | None = None) -> dict:
    """The stored entries after a search: per searched name, its fastest checked candidate when it
    beats the kernels it replaces (``base_us[name]``: what -> µs, all timed); otherwise the name's
    entry is removed (a stale choice that no longer wins, or whose constants now fail the check, is
    never kept). Names not searched keep their entries. ``what`` prefixes the log lines; ``label``
    names a candidate's ``config`` dict (default: the fused norm + GEMV's constants)."""
    label_of = label or (lambda c: NormGemvConfig(**c).label())
    for name, entry in found.items():
        good = [c for c in entry["candidates"] if c.get("ok")]
        rejected = sum(1 for c in entry["candidates"] if "ok" in c and not c["ok"])
        pair = base_us.get(name) or {}
        pair_us = sum(pair.values()) if pair and None not in pair.values() else None
        if not good:
            kernels.pop(name, None)
            log(f"{what}: {name}: no candidate passed the check ({rejected} rejected); not stored")
            continue
        best = min(good, key=lambda c: c["us"])
        label_txt = label_of(best["config"])
        if pair_us is None:
            kernels.pop(name, None)
            log(f"{what}: {name}: best {label_txt} {best['us']:.2f} us, but the kernels it replaces were not "
                "timed; not stored")
            continue
        verdict = f"{pair_us:.2f} us ({', '.join(f'{w} {u:.2f}' for w, u in pair.items())})"
        if best["us"] >= pair_us:
            kernels.pop(name, None)
            log(f"{what}: {name}: best {label_txt} {best['us']:.2f} us, not faster than the kernels it replaces, "
                f"{verdict}; not stored")
            continue
        kernels[name] = {**entry, "config": best["config"], "us": best["us"], "rejected": rejected,
                         "unfused_us": pair_us, "unfused": pair}
        log(f"{what}: {name}: best {label_txt} {best['us']:.2f} us vs the kernels it replaces, {verdict} "
            f"({len(good)} checked, {rejected} rejected)")
    return kernels


def pick_plain(kernels: dict, *, log: Callable[[str], None] = print) -> dict:
    """Where a norm + linear pair has both forms stored, keep the faster whole and drop the other
    entry: the fused kernel against the plain linear kernel plus the standalone layer norm (its time
    from the fused entry's timed pair). Without that time the fused form stays (the model takes it
    first anyway)."""
    for name in [n for n in kernels if n.endswith("_plain")]:
        fused = name[: -len("_plain")]
        if fused not in kernels:
            continue  # (the c_proj layers have no fused form)
        norm_us = next((u for w, u in (kernels[fused].get("unfused") or {}).items()
                        if w.startswith("norm ") and u is not None), None)
        fused_us, plain_us = kernels[fused]["us"], kernels[name]["us"]
        if norm_us is not None and plain_us + norm_us < fused_us:
            kernels.pop(fused)
            log(f"norm+gemv: {name}: norm {norm_us:.2f} us + plain {plain_us:.2f} us beat the fused "
                f"{fused_us:.2f} us; the fused entry dropped")
        else:
            kernels.pop(name)
            plain = f"{plain_us:.2f} us + norm " + (f"{norm_us:.2f} us" if norm_us is not None else "(untimed)")
            log(f"norm+gemv: {fused}: fused {fused_us:.2f} us kept over the plain form ({plain}); the plain entry dropped")
    return kernels


def read_norm_gemv_plan(db_dir: str | os.PathLike | None) -> NormGemvPlan | None:
    """The plan of a database's ``norm_gemv.json`` (None: no file, or nothing stored). A malformed
    entry, or one whose constants are not legal for its key, is skipped with a warning; the build
    then keeps that pair unfused. A file that is not JSON is one ``ValueError`` naming it."""
    return read_plan(db_dir, file=NORM_GEMV_FILE, parse=parse_entry, make_plan=NormGemvPlan)


def read_plan(db_dir: str | os.PathLike | None, *, file: str, parse: Callable, make_plan: Callable):
    """``make_plan({name: config})`` of a template choice file's entries (``parse(name, entry) ->
    (key, config)``; an entry it refuses is skipped with a warning), None without file or entries."""
    if db_dir is None:
        return None
    doc = read_json(Path(db_dir) / file, None)
    if not isinstance(doc, dict) or not doc.get("kernels"):
        return None
    configs = {}
    for name, entry in doc["kernels"].items():
        try:
            configs[name] = parse(name, entry)[1]
        except ValueError as err:
            logger.warning("%s: entry %s skipped (%s)", file, name, err)
    return make_plan(configs) if configs else None


def norm_gemv_plan_for(db_dir: str | os.PathLike | None, target) -> NormGemvPlan | None:
    """The plan a build for ``target`` with the database at ``db_dir`` uses (GPU targets only)."""
    return read_norm_gemv_plan(db_dir) if db_dir is not None and is_gpu(target) else None


def parse_entry(name: str, entry: dict) -> tuple[NormGemvKey | None, NormGemvConfig]:
    """``(key, config)`` of a ``norm_gemv.json`` entry (key None when the entry has none).

    Raises
    ------
    ValueError
        The entry is malformed, holds another name's key, or its constants cannot make its kernel.
    """
    return parse_template_entry(name, entry, config_cls=NormGemvConfig, key_cls=NormGemvKey,
                                problem=lambda key, cfg: norm_gemv_problem(cfg, key))


def parse_template_entry(name: str, entry: dict, *, config_cls, key_cls, problem: Callable):
    """``(key or None, config)`` of a template choice file's entry: its ``config`` (and ``key``)
    dicts made into ``config_cls`` (``key_cls``); ``ValueError`` when malformed, when the key is
    another name's, or when ``problem(key, config)`` names why the constants cannot make the kernel."""
    try:
        cfg = config_cls(**entry["config"])
        key = key_cls(**entry["key"]) if "key" in entry else None
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed: {err}") from None
    if key is not None and key.name() != name:
        raise ValueError(f"entry named {name} holds the key of {key.name()}")
    why = problem(key, cfg) if key is not None else None
    if why is not None:
        raise ValueError(f"not a legal configuration of {key.name()}: {why}")
    return key, cfg
