"""Tuning the KV cache's attention kernels (outside the partition: they come pre-scheduled).

TVM's paged KV cache (``tvm.relax.frontend.nn.llm.kv_cache``) adds its attention kernels to the
module already scheduled, from a template whose constants come from one heuristic
(``_get_prefill_kernel_config``). For GPT-2 small on CUDA (12 heads of 64, fp16) it picks
``NUM_BLKS = 16`` blocks per head, a 32x32 query/key tile, 4 warps and 8-byte loads. At a 1024-token
chunk each head's 32 query tiles then queue on 16 blocks (causal: the late tiles do 32 key tiles of
work each), and 192 blocks of 128 threads fill a 132-SM card a few warps deep. These kernels are a
large part of a prefill chunk, and MetaSchedule cannot search them (they are scheduled, with
thread-invariant loops over ragged sequences).

So this module searches the template's constants instead, the same way the design spaces of
:mod:`tuning.spaces` open dlight's:

================  =====================================================  ===============
knob              meaning                                                TVM's choice
================  =====================================================  ===============
``num_blks``      blocks per KV head (blockIdx.x); tiles are strided     16
``tile_x``        query rows per tile                                     32 (fp16, d=64)
``tile_z``        keys per inner step                                     32
``num_warps``     warps per block (threadIdx.y)                           4
``load_vec``      elements per vectorized global→shared load              4 (8 bytes)
================  =====================================================  ===============

Every candidate is checked with TVM's own legality rules (thread factorization and static
shared memory), built in parallel with MetaSchedule's builder, checked against a NumPy causal
attention reference, and timed with ``time_evaluator`` at the prefill lengths tuned. One kernel
serves every chunk length, so the objective is the geometric mean over lengths of the time
relative to TVM's kernel, and a candidate more than 5% slower than TVM's at any length is out
(on an H200 the fastest kernel at 1024 tokens was 11% slower at 512). TVM's configuration is
always a candidate and the winner is stored only when it is better, so the stored choice is
never slower than the untuned build's kernel as measured.

A second template, ``"tc"`` (:mod:`tuning.attention_tc`: the same kernel with its two inner
products on tensor cores, wmma fp16/fp32), has its own constants (warps, key tile) and joins the
same search, checked and scored the same way; so does ``"fa"`` on sm_90 (:mod:`tuning.attention_fa`: a
Hopper flash-attention kernel with TMA and wgmma, a TIRx PrimFunc built by :mod:`tuning.attention_build`). ``attention.json`` names the template of each
result (``"template"``; a file without it is SIMT).

The result is ``attention.json`` in the database directory; compiling with the database
(:func:`apply_attention`) regenerates the kernel with the stored constants.
``batch_prefill_ragged_kv`` (the self-attention of a chunk over itself, which is all of a prefill
from an empty sequence) is tuned by :func:`tune_attention`; ``batch_decode_paged_kv`` (a decode
step over the paged cache) by :func:`tuning.attention_decode_tune.tune_decode_attention`, whose candidates are TVM's kernel and
the template of :mod:`tuning.attention_decode` (``"template": "decode"``; stored only when a
candidate passed the NumPy check and beats TVM's kernel). Each is one entry of ``kernels`` in
``attention.json`` (a file without a decode entry keeps TVM's decode kernel); the paged prefill
kernel stays TVM's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .attention_measure import (measure_ragged_prefill, prefill_scalars, ragged_prefill_args,  # noqa: F401 - re-exported
                                reference_causal_attention, reference_causal_lse)
from .attention_build import build_all as _build_all
from .attention_build import make_candidates as _make_candidates
from .attention_decode import DECODE_KERNEL, DecodeConfig, DecodeError, is_decode_legal, make_decode_kernel
from .attention_fa import FAConfig, FAError, fa_candidates, make_fa_ragged_prefill
from .attention_tc import (TCConfig, TCError, make_tc_ragged_prefill, mma_candidates, tc_candidates,
                           wmma_candidates)

logger = logging.getLogger(__name__)

ATTENTION_FILE = "attention.json"
RAGGED_PREFILL = "batch_prefill_ragged_kv"

__all__ = [
    "ATTENTION_FILE",
    "DECODE_KERNEL",
    "RAGGED_PREFILL",
    "AttentionError",
    "AttentionKey",
    "PrefillConfig",
    "apply_attention",
    "attention_key",
    "default_prefill_config",
    "make_ragged_prefill",
    "measure_ragged_prefill",
    "prefill_candidates",
    "search_candidates",
    "read_attention",
    "stored_best",
    "KERNEL_MAKERS",
    "reference_causal_attention",
    "ragged_prefill_args",
    "tune_attention",
]


class AttentionError(ValueError):
    """A bad ``attention.json`` or a configuration TVM's template cannot schedule."""


@dataclass(frozen=True)
class AttentionKey:
    """What the kernel is generated for (the KV cache's parameters)."""

    h_kv: int
    h_q: int
    d: int
    dtype: str

    def label(self) -> str:
        return f"h_kv={self.h_kv} h_q={self.h_q} d={self.d} {self.dtype}"


@dataclass(frozen=True)
class PrefillConfig:
    """The template constants of the prefill attention kernel."""

    num_blks: int
    tile_x: int
    tile_z: int
    num_warps: int
    load_vec: int

    def label(self) -> str:
        return (f"blks={self.num_blks} tile={self.tile_x}x{self.tile_z} warps={self.num_warps} "
                f"vec={self.load_vec}")


def attention_key(config, dtype: str) -> AttentionKey:
    """The key of a GPT-2 config's KV cache (multi-head: as many KV heads as query heads)."""
    return AttentionKey(h_kv=int(config.n_head), h_q=int(config.n_head), d=int(config.head_dim), dtype=str(dtype))


def _kernels():
    from tvm.relax.frontend.nn.llm import _kernel_common, _prefill_kernels  # pylint: disable=import-outside-toplevel

    return _kernel_common, _prefill_kernels


def default_prefill_config(key: AttentionKey, target) -> PrefillConfig:
    """TVM's choice for this key and target (what the untuned build runs)."""
    common, _ = _kernels()
    num_blks, load_vec, _, _, num_warps, tile_x, _, tile_z = common._get_prefill_kernel_config(  # pylint: disable=protected-access
        key.h_kv, key.h_q, key.d, key.dtype, target)
    return PrefillConfig(num_blks=int(num_blks), tile_x=int(tile_x), tile_z=int(tile_z), num_warps=int(num_warps),
                         load_vec=int(load_vec))


def _shared_limit(target) -> int:
    try:
        return int(target.attrs["max_shared_memory_per_block"])
    except (KeyError, TypeError):
        return 48 * 1024


def is_legal(cfg: PrefillConfig, key: AttentionKey, target) -> bool:
    """TVM's own factorization rules plus the static shared-memory limit and 1024 threads."""
    common, _ = _kernels()
    if cfg.num_warps * 32 > 1024 or min(cfg.num_blks, cfg.tile_x, cfg.tile_z, cfg.num_warps, cfg.load_vec) < 1:
        return False
    tile_y = key.d
    if not common._is_prefill_kernel_config_legal(  # pylint: disable=protected-access
            cfg.tile_x, tile_y, cfg.tile_z, key.d, cfg.load_vec, 32, cfg.num_warps, False):
        return False
    smem = common._get_prefill_shared_memory_usage(cfg.tile_x, cfg.tile_z, key.d, key.dtype)  # pylint: disable=protected-access
    return smem <= _shared_limit(target)


def prefill_candidates(key: AttentionKey, target, *, num_blks: Sequence[int] = (16, 32, 48, 64, 96, 128),
                       tiles: Sequence[int] = (16, 32, 64), warps: Sequence[int] = (4, 8),
                       load_vecs: Sequence[int] | None = None) -> list[PrefillConfig]:
    """The legal configurations of the search grid; TVM's default comes first."""
    elem = 2 if "16" in key.dtype else 4
    # 16-byte loads build here but not with the H200 machine's nvcc (2026-11-26: every vec=8
    # candidate failed to compile there), so the default grid keeps TVM's 8-byte loads.
    vecs = load_vecs if load_vecs is not None else [8 // elem]
    default = default_prefill_config(key, target)
    out = [default]
    for nb in num_blks:
        for tx in tiles:
            for tz in tiles:
                for w in warps:
                    for v in vecs:
                        c = PrefillConfig(num_blks=nb, tile_x=tx, tile_z=tz, num_warps=w, load_vec=v)
                        if c != default and is_legal(c, key, target):
                            out.append(c)
    return out


def search_candidates(key: AttentionKey, target, templates: Sequence[str] | None = None,
                      stored: dict | None = None) -> list:
    """The prefill search's candidates of the families ``templates`` (``simt``: TVM's template's grid,
    ``tc``: the wmma tensor-core grid, ``mma``: its mma.sync variant, ``fa``: the wgmma flash-attention
    kernel, sm_90 only, by name; default the other three), TVM's own choice first, plus ``stored`` (an ``attention.json`` entry) 's choice, so that a narrowed search
    is always measured against what the database holds."""
    # ("fa" is asked for by name until it has been checked on a card: see .notes/attention_fa.md)
    templates = tuple(templates) if templates else ("simt", "tc", "mma")
    out = prefill_candidates(key, target) if "simt" in templates else [default_prefill_config(key, target)]
    if "tc" in templates:
        out += wmma_candidates(key, target)
    if "mma" in templates:
        out += mma_candidates(key, target)
    if "fa" in templates:
        out += fa_candidates(key, target)
    if stored is not None and stored.get("kernel") == RAGGED_PREFILL and stored.get("key") == asdict(key):
        try:
            best = stored_best(stored)
        except (KeyError, TypeError) as err:  # an entry this version cannot read: searched without it
            logger.warning("attention.json's stored prefill choice is unreadable (%s); not re-timed", err)
        else:
            if best not in out:
                out.append(best)
    return out


@contextlib.contextmanager
def _patched_config(cfg: PrefillConfig, key: AttentionKey) -> Iterator[None]:
    """Make TVM's template see ``cfg`` instead of its heuristic's choice."""
    _, prefill = _kernels()
    original = prefill._get_prefill_kernel_config  # pylint: disable=protected-access

    def fixed(h_kv, h_q, d, dtype, target, **_kw):  # pylint: disable=unused-argument
        if (h_kv, h_q, d) != (key.h_kv, key.h_q, key.d):
            return original(h_kv, h_q, d, dtype, target, **_kw)
        return cfg.num_blks, cfg.load_vec, h_q // h_kv, 32, cfg.num_warps, cfg.tile_x, d, cfg.tile_z

    prefill._get_prefill_kernel_config = fixed  # pylint: disable=protected-access
    try:
        yield
    finally:
        prefill._get_prefill_kernel_config = original  # pylint: disable=protected-access


def make_ragged_prefill(cfg: PrefillConfig | None, key: AttentionKey, target):
    """``batch_prefill_ragged_kv`` from TVM's template with ``cfg`` (``None``: TVM's own choice).

    Raises
    ------
    AttentionError
        ``cfg`` is not legal for the template.
    """
    _, prefill = _kernels()
    if cfg is None:
        return prefill._attention_prefill_ragged(key.h_kv, key.h_q, key.d, key.d, key.dtype, {}, target)  # pylint: disable=protected-access
    if not is_legal(cfg, key, target):
        raise AttentionError(f"attention config {cfg.label()} is not legal for {key.label()} on this target")
    with _patched_config(cfg, key):
        try:
            return prefill._attention_prefill_ragged(key.h_kv, key.h_q, key.d, key.d, key.dtype, {}, target)  # pylint: disable=protected-access
        except Exception as err:  # noqa: BLE001 - the template's scheduler rejects the factorization
            raise AttentionError(f"TVM's prefill template cannot schedule {cfg.label()}: {err}") from err


#: Each stored template's configuration class: ``"simt"`` (TVM's template), ``"tc"`` and ``"fa"``
#: (prefill), ``"decode"`` (:class:`tuning.attention_decode.DecodeConfig`).
_CONFIG_CLASSES = {"simt": PrefillConfig, "tc": TCConfig, "fa": FAConfig, "decode": DecodeConfig}


def config_of(template: str, config: dict):
    """The configuration object of a stored result (``template``: a key of ``_CONFIG_CLASSES``)."""
    if template not in _CONFIG_CLASSES:
        raise KeyError(f"unknown attention template {template!r}")
    return _CONFIG_CLASSES[template](**config)


def template_name(cfg) -> str:
    """The ``attention.json`` template of a configuration object (the inverse of :func:`config_of`)."""
    return next(name for name, cls in _CONFIG_CLASSES.items() if isinstance(cfg, cls))


#: The templates each tuned kernel of ``attention.json`` may name.
_TEMPLATES = {RAGGED_PREFILL: ("simt", "tc", "fa"), DECODE_KERNEL: ("decode",)}


def make_prefill_kernel(cfg, key: AttentionKey, target):
    """``batch_prefill_ragged_kv`` of any template (``cfg`` None: TVM's own choice)."""
    if isinstance(cfg, FAConfig):
        return make_fa_ragged_prefill(cfg, key, target)
    if isinstance(cfg, TCConfig):
        return make_tc_ragged_prefill(cfg, key, target)
    return make_ragged_prefill(cfg, key, target)


#: The generator of each tuned KV-cache kernel (called with config None: TVM's own kernel).
KERNEL_MAKERS = {RAGGED_PREFILL: make_prefill_kernel, DECODE_KERNEL: make_decode_kernel}


def stored_best(entry: dict):
    """The configuration object of an ``attention.json`` entry's stored choice (its template's)."""
    return config_of(entry["best"].get("template", "simt"), entry["best"]["config"])


# ------------------------------------------------------------------------------------------------
# attention.json
# ------------------------------------------------------------------------------------------------


def read_attention(db_dir: str | os.PathLike) -> dict | None:
    """The stored attention choices of a database directory (``None`` when there are none).

    Raises
    ------
    AttentionError
        The file is not valid JSON or lacks the fields compile needs.
    """
    path = Path(db_dir) / ATTENTION_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        for entry in doc["kernels"]:
            AttentionKey(**entry["key"])
            if entry["kernel"] not in _TEMPLATES:
                raise KeyError(f"unknown kernel {entry['kernel']!r}")
            template = entry["best"].get("template", "simt")
            if template not in _TEMPLATES[entry["kernel"]]:
                raise KeyError(f"template {template!r} is not one of {entry['kernel']}")
            config_of(template, entry["best"]["config"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise AttentionError(f"{path} is not a valid attention tuning file ({err}); delete it or re-run "
                             "tune --kinds attention") from err
    return doc


def _with_attrs_of(func, like):
    for name, value in (like.attrs.items() if like.attrs is not None else []):
        if name != "s_tir" or func.attrs is None or "s_tir" in func.attrs:  # a tirx kernel stays tirx
            func = func.with_attr(name, value)
    return func


def apply_attention(mod, db_dir: str | os.PathLike | None, *, key: AttentionKey, target):
    """Replace the attention kernels of ``mod`` by the database's tuned ones; returns (mod, applied).

    A stored entry is applied only when its key matches the model's KV cache and the kernel in
    ``mod`` is TVM's default for that key (structural equality), so a stale file never swaps in a
    kernel for other shapes. ``mod`` itself is not modified.
    """
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    doc = read_attention(db_dir) if db_dir is not None else None
    if not doc:
        return mod, []
    names = {gv.name_hint: gv for gv in mod.functions}
    out, applied = mod, []
    for entry in doc["kernels"]:
        if AttentionKey(**entry["key"]) != key or entry["kernel"] not in names:
            continue
        best, make = stored_best(entry), KERNEL_MAKERS[entry["kernel"]]
        if entry["kernel"] == DECODE_KERNEL:
            default_label = "its own kernel"
            best = decode_form_for_pdl(best, key, target)
        else:
            default = default_prefill_config(key, target)
            if best == default:
                continue
            default_label = default.label()
        gv = names[entry["kernel"]]
        current = mod[gv]
        # compare and replace with the module's own function attributes (global_symbol, and
        # op_pattern that relax's AnnotateTIROpPattern adds)
        if not tvm_ffi.structural_equal(current, _with_attrs_of(make(None, key, target), current)):
            logger.warning("%s in the module is not TVM's default kernel for %s: stored attention tuning not applied",
                           entry["kernel"], key.label())
            continue
        try:
            func = _with_attrs_of(make(best, key, target), current)
        except (AttentionError, DecodeError, TCError, FAError) as err:
            raise AttentionError(f"{Path(db_dir) / ATTENTION_FILE}: the stored {entry['kernel']} choice cannot be "
                                 f"built ({err}); delete the entry or re-run tune --kinds attention") from err
        if out is mod:
            out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs, global_infos=mod.global_infos)
        out[gv] = func
        applied.append(f"{entry['kernel']}: {best.label()} (TVM: {default_label})")
    for line in applied:
        logger.info("tuned attention %s", line)
    return out, applied


def decode_form_for_pdl(cfg, key: AttentionKey, target):
    """The decode attention configuration a build runs for the stored ``cfg``: with programmatic
    dependent launch on (``GPT2K_PDL``, :func:`tuning.pdl.pdl_mode`) the same constants in the ``l2``
    form where that is legal (the context's K/V to L2, then the PDL wait: under PDL that overlaps the
    previous kernel, which the search, timing each kernel alone, cannot see); else ``cfg`` itself."""
    from .pdl import pdl_mode  # pylint: disable=import-outside-toplevel

    if not isinstance(cfg, DecodeConfig) or cfg.l2 or pdl_mode(target) is None:
        return cfg
    l2 = replace(cfg, l2=True)
    return l2 if is_decode_legal(l2, key, target) else cfg


#: A candidate may be at most this much slower than TVM's kernel at any tuned length.
MAX_REGRESSION = 1.05


def _score(results: list[dict], base: dict) -> None:
    """Objective of each result: the geometric mean of its time over TVM's time across lengths
    (one kernel serves every chunk length, so each length counts the same), and whether no length
    is more than :data:`MAX_REGRESSION` slower than TVM's."""
    for r in results:
        ratios = [r["us"][n] / base["us"][n] for n in base["us"]]
        r["score"] = float(np.exp(np.mean(np.log(ratios))))
        r["eligible"] = max(ratios) <= MAX_REGRESSION


def tune_attention(config, *, dtype: str, target, out_dir: str | os.PathLike, lengths: Sequence[int],
                   device=None, candidates: Sequence | None = None, workers: int | None = None,
                   top: int = 8, log: Callable[[str], None] = print) -> dict:
    """Search the prefill attention template for ``config`` on the local GPU; write ``attention.json``.

    Parameters
    ----------
    config : GPT2Config
    dtype : str
        The KV cache dtype (the quantization's activation dtype).
    target : tvm.target.Target
        A CUDA target of this machine's arch.
    out_dir : path
        Database directory receiving ``attention.json`` (created if needed).
    lengths : sequence of int
        Chunk lengths to time each candidate at (the prefill buckets); see the objective above.
    device : tvm.runtime.Device, optional
        Default ``tvm.cuda(0)``.
    candidates : sequence of PrefillConfig or TCConfig, optional
        Default :func:`prefill_candidates` and :func:`tuning.attention_tc.tc_candidates` (TVM's
        choice is added when missing).
    top : int
        Candidates re-timed at length after the screening pass (TVM's is always re-timed).

    Returns
    -------
    dict
        The document written.
    """
    import tvm  # pylint: disable=import-outside-toplevel

    device = device or tvm.cuda(0)
    if not device.exist:
        raise AttentionError("attention tuning measures on a local CUDA GPU, and this machine has none")
    key = attention_key(config, dtype)
    default = default_prefill_config(key, target)
    cands = (list(candidates) if candidates is not None
             else prefill_candidates(key, target) + tc_candidates(key, target))
    if default not in cands:
        cands.insert(0, default)
    lengths = sorted({int(n) for n in lengths})
    t0 = time.time()
    made = _make_candidates(make_prefill_kernel, [(c, key, target) for c in cands],
                            expected=(AttentionError, TCError, FAError), workers=workers)
    kept, funcs = [cands[i] for i, _ in made], [f for _, f in made]
    log(f"attention: {len(kept)} candidates of {RAGGED_PREFILL} for {key.label()} (TVM's: {default.label()}), "
        f"timed at {lengths}; building...")
    paths, errors = _build_all(funcs, target, workers=workers)
    log(f"attention: built {sum(p is not None for p in paths)}/{len(paths)} in {time.time() - t0:.0f} s; measuring")
    failed = [c.label() for c, p in zip(kept, paths) if p is None]
    if failed:
        tail = [ln for ln in errors[0].splitlines() if ln.strip()][-3:]
        log(f"attention: failed to build: {', '.join(failed[:12])}{' ...' if len(failed) > 12 else ''}; "
            f"first error: {' | '.join(tail)}")
    results, refs, libs = [], {}, {}
    for c, p in zip(kept, paths):  # screening: a few calls per length
        if p is None:
            continue
        try:
            lib = tvm.runtime.load_module(p)
            times, err = measure_ragged_prefill(lib, key, lengths, device=device, number=3, repeat=3, refs=refs)
        except Exception as exc:  # noqa: BLE001 - a candidate that faults is dropped, not fatal
            log(f"attention: {c.label()} failed to run: {str(exc).splitlines()[0] if str(exc) else exc}")
            continue
        libs[c] = lib
        results.append({"template": template_name(c), "config": asdict(c), "us": times, "total_us": sum(times.values()),
                        "max_abs_err": err})
    base = next((r for r in results if r["template"] == "simt" and r["config"] == asdict(default)), None)
    if base is None:
        raise AttentionError("TVM's own prefill attention kernel could not be measured on this device")
    if not math.isfinite(base["max_abs_err"]):
        raise AttentionError("TVM's own prefill attention kernel fails the NumPy check on this device "
                             f"(error {base['max_abs_err']}): the search has no reference to trust")
    tol = max(2 * base["max_abs_err"], 2e-2 if "16" in dtype else 1e-4)
    _score(results, base)
    results.sort(key=lambda r: (not r["eligible"], r["score"]))
    finalists = [r for r in results if r["max_abs_err"] <= tol and r["eligible"]][:top]
    if base not in finalists:
        finalists.append(base)
    for r in finalists:  # the final word: longer timing of the best few and TVM's
        times, _ = measure_ragged_prefill(libs[config_of(r["template"], r["config"])], key, lengths, device=device,
                                          number=20, repeat=7, refs=refs)
        r.update(us=times, total_us=sum(times.values()), screened_us=r["us"])
    _score(finalists, base)
    results = finalists + [r for r in results if r not in finalists]
    ok = sorted((r for r in finalists if r["max_abs_err"] <= tol and r["eligible"]), key=lambda r: r["score"])
    rejected = sum(r["max_abs_err"] > tol for r in results)
    best = ok[0] if ok and ok[0]["score"] < 1.0 else base
    entry = {
        "kernel": RAGGED_PREFILL,
        "key": asdict(key),
        "lengths": lengths,
        "default": base,
        "best": best,
        "speedup": base["total_us"] / best["total_us"],
        "objective": f"geometric mean over lengths of time / TVM's time, no length more than "
                     f"{100 * (MAX_REGRESSION - 1):.0f}% slower than TVM's",
        "candidates": len(results),
        "rejected_numerics": rejected,
        "tolerance_abs": tol,
        "top": ok[:8],
        "screened": [{"template": r["template"], "config": r["config"], "us": r.get("screened_us", r["us"]),
                      "max_abs_err": r["max_abs_err"]} for r in results],
    }
    out = Path(out_dir)
    doc = _write_entry(out, entry, device=device, tuning_s=time.time() - t0)
    per = ", ".join(f"{n}: {base['us'][n]:.1f}->{best['us'][n]:.1f} us" for n in lengths)
    log(f"attention: best {config_of(best['template'], best['config']).label()} ({per}; "
        f"geomean {1 / best['score']:.2f}x over TVM's; {rejected} rejected by the NumPy check) in {doc['tuning_s']:.0f} s -> {out / ATTENTION_FILE}")
    return doc


def _write_entry(out: Path, entry: dict, *, device, tuning_s: float) -> dict:
    """Write ``entry`` first into ``out/attention.json``, keeping the file's entries of other kernels
    or keys (an unreadable file is replaced); returns the document written."""
    import tvm  # pylint: disable=import-outside-toplevel

    from .dbfiles import atomic_write_text as _atomic_write_text  # pylint: disable=import-outside-toplevel

    try:
        previous = read_attention(out) or {}
    except AttentionError as err:
        logger.warning("%s; replacing it", err)
        previous = {}
    others = [e for e in previous.get("kernels", []) if (e["kernel"], e["key"]) != (entry["kernel"], entry["key"])]
    doc = {
        "kernels": [entry] + others,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": device.device_name if hasattr(device, "device_name") else str(device),
        "tvm": tvm.__version__,
        "tuning_s": tuning_s,
    }
    _atomic_write_text(out / ATTENTION_FILE, json.dumps(doc, indent=1))
    return doc
