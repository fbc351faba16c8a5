"""Measuring a ``batch_prefill_ragged_kv`` kernel: NumPy references, seeded inputs, timing.

Used by the attention search (:mod:`tuning.attention`) and its GPU check scripts. ``key`` is an
:class:`tuning.attention.AttentionKey` (heads, head dim, dtype); this module needs only its fields.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .graph_timer import kernel_us

__all__ = ["BATCH_CASE", "abs_error", "measure_ragged_prefill", "ragged_batch_args", "ragged_prefill_args",
           "reference_causal_attention", "reference_causal_lse", "prefill_scalars"]

#: The ragged batch every candidate is also checked on (not timed): several sequences of uneven
#: lengths in one call, so that tile scheduling across sequences and partial tiles are verified too.
BATCH_CASE = (77, 200, 33, 1)


def reference_causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float) -> np.ndarray:
    """Causal softmax attention of one sequence in float32 (NumPy): q/k/v ``[n, heads, d]``."""
    q32, k32, v32 = (np.asarray(x, np.float32) for x in (q, k, v))
    n = q32.shape[0]
    s = np.einsum("qhd,khd->hqk", q32, k32) * sm_scale
    s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v32)


def reference_causal_lse(q: np.ndarray, k: np.ndarray, sm_scale: float) -> np.ndarray:
    """Base-2 log-sum-exp of the causal scores (what the kernels write to ``lse``): ``[n, heads]``."""
    q32, k32 = (np.asarray(x, np.float32) for x in (q, k))
    n = q32.shape[0]
    s = np.einsum("qhd,khd->hqk", q32, k32) * sm_scale
    s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    return ((m[..., 0] + np.log(np.exp(s - m).sum(axis=-1))) / math.log(2)).T


def ragged_prefill_args(key, n: int, *, device, seed: int = 0):
    """(positional args, q, k, v, sm_scale) of one causal prefill of ``n`` tokens (batch of 1)."""
    args, q, k, v, _, sm_scale = ragged_batch_args(key, [n], device=device, seed=seed)
    return args, q, k, v, sm_scale


def ragged_batch_args(key, lengths: Sequence[int], *, device, seed: int = 0):
    """(positional args, q, k, v, indptr, sm_scale) of one causal prefill of a ragged batch: sequence
    ``i`` has ``lengths[i]`` tokens (queries and keys alike, as in a fresh prefill chunk)."""
    import tvm  # pylint: disable=import-outside-toplevel

    n = int(sum(lengths))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, key.h_q, key.d)).astype(key.dtype)
    k = rng.standard_normal((n, key.h_kv, key.d)).astype(key.dtype)
    v = rng.standard_normal((n, key.h_kv, key.d)).astype(key.dtype)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.concatenate([np.arange(m, dtype=np.int32) for m in lengths])
    nd = lambda a: tvm.runtime.tensor(a, device)  # noqa: E731
    sm_scale = 1.0 / math.sqrt(key.d)
    args = [nd(q), nd(indptr), nd(k), nd(v), nd(indptr), nd(positions),
            nd(np.zeros(len(lengths), np.int32)), nd(np.zeros((n, key.h_q, key.d), key.dtype)),
            nd(np.zeros((n, key.h_q), np.float32))]
    return args, q, k, v, indptr, sm_scale


def abs_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference of a kernel's result from its reference; a NaN or inf anywhere in the
    result is an infinite error (``max`` over NaN differences would silently give 0)."""
    got = np.asarray(got, np.float32)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - ref).max())


def _poison(args, key) -> None:
    """Fill the output and lse buffers with NaN: an element the kernel does not write fails the check."""
    args[7].copyfrom(np.full(args[7].shape, np.nan, key.dtype))
    args[8].copyfrom(np.full(args[8].shape, np.nan, np.float32))


def _batch_error(fn, key, *, device, refs: dict) -> float:
    """Max abs error (output and lse) of ``fn`` on :data:`BATCH_CASE` against NumPy, per sequence."""
    args, q, k, v, indptr, sm_scale = ragged_batch_args(key, BATCH_CASE, device=device, seed=99)
    _poison(args, key)
    fn(*args, *prefill_scalars(sm_scale))
    device.sync()
    if "batch" not in refs:
        refs["batch"] = [(reference_causal_attention(q[a:b], k[a:b], v[a:b], sm_scale),
                          reference_causal_lse(q[a:b], k[a:b], sm_scale)) for a, b in zip(indptr[:-1], indptr[1:])]
    out, lse = args[7].numpy().astype(np.float32), args[8].numpy()
    err = 0.0
    for (a, b), (ref_out, ref_lse) in zip(zip(indptr[:-1], indptr[1:]), refs["batch"]):
        err = max(err, abs_error(out[a:b], ref_out), abs_error(lse[a:b], ref_lse))
    return err


def prefill_scalars(sm_scale: float) -> tuple:
    # causal=1, rotary_mode=0 (GPT-2 has learned positions), rope_scale, rope_theta, sm_scale
    return (1, 0, 1.0, 1.0, sm_scale)


def measure_ragged_prefill(lib, key, lengths: Sequence[int], *, device, number: int = 10,
                           repeat: int = 5, refs: dict | None = None) -> tuple[dict[int, float], float]:
    """Median µs per call at each length, and the max abs error against NumPy over all lengths
    (of the output and of the base-2 ``lse``, which the KV cache merges with later chunks) and
    over the ragged batch :data:`BATCH_CASE` (checked, not timed). The outputs are NaN before each
    checked call, and a non-finite result is an infinite error (2026-12-02: a candidate whose
    output was NaN scored 0.0 through ``max`` and was stored).

    ``lib`` is a runtime module whose ``main`` is a ``batch_prefill_ragged_kv`` kernel; ``refs``
    caches the NumPy references per length across candidates (same seeded inputs).
    """
    fn = lib["main"]
    refs = {} if refs is None else refs
    times: dict[int, float] = {}
    err = 0.0
    for i, n in enumerate(lengths):
        args, q, k, v, sm_scale = ragged_prefill_args(key, n, device=device, seed=i)
        _poison(args, key)
        fn(*args, *prefill_scalars(sm_scale))
        device.sync()
        if n not in refs:
            refs[n] = reference_causal_attention(q, k, v, sm_scale), reference_causal_lse(q, k, sm_scale)
        err = max(err, abs_error(args[7].numpy(), refs[n][0]), abs_error(args[8].numpy(), refs[n][1]))
        times[int(n)] = kernel_us(lib, [*args, *prefill_scalars(sm_scale)], device=device, number=number,
                                  repeat=repeat)[0]
    err = max(err, _batch_error(fn, key, device=device, refs=refs))
    return times, err
