"""Tunable design spaces for decode GEMV / low-batch GEMM (rows 1..64), fp16 and q4f16_1.

The structure is dlight's ``LowBatchGEMV`` / ``GEMV`` inner-reduction schedule (split K over the
threads of a row group, reduce across threads, keep the whole batch of a weight element in
registers), with its constants turned into sampled decisions so MetaSchedule searches them:

======================  =======================================  ==============================
knob                    instruction                               dlight's fixed choice (CUDA)
======================  =======================================  ==============================
``vec``  K elements a   ``sample_categorical`` (fp16: 1,2,4,8;    4 (``VEC_C``)
thread loads per step   q4: 8,16,32 = 1,2,4 packed words)
``tr`` threads along K  fp16: ``sample_categorical`` of 8..128    32 or 64
(split-K width;         dividing K/8, half the weight on 32; q4:
cross-thread reduce)    ``sample_perfect_tile`` of K/vec (≤128)
``ts`` rows per block   ``sample_categorical`` 1,2,4,8,16          4 or 16
(threadIdx.y)
``tile_n`` rows per     ``sample_categorical`` 1,2,4                2 (``TILE_S``)
thread
batch tile              ``sample_categorical`` of the batch's       whole padded batch
(rows per block;        divisors (blocks along y), half on 1
rest → blockIdx.y)
unroll                  ``sample_categorical`` 0,16,64,256,1024    256
                        (``meta_schedule.unroll_explicit``)
x staging               two design spaces: activations read from  shared (``LOAD_V_SHARED``)
                        global or staged through shared memory
======================  =======================================  ==============================

Weights are read once per step with a vectorized load into registers (up to 16 bytes); for
q4f16_1 the packed words and the group scale are cached and dequantized in registers (the
``dequantize`` stage is inlined into the matmul). Epilogues (bias, GELU, residual add) run on
the reduced value in registers.

Only structure-independent values are sampled: the trace of every design space is the same
sequence of primitives whatever the decisions, so MetaSchedule can re-sample and mutate it and
the database can replay it.
"""

from __future__ import annotations

from tvm import s_tir

from ._analysis import _extent, normalize_gemv
from ._analysis import uniform as _uniform

__all__ = ["GEMV_VARIANTS", "schedule_gemv"]

#: The structural variants (one design space each): activations staged in shared or not.
GEMV_VARIANTS = ("x_global", "x_shared")

_UNROLL = [0, 16, 64, 256, 1024]


def _lean_to(options: list[int], favourite: int) -> list[float]:
    """Half the probability on ``favourite`` (when offered), the rest spread evenly."""
    if favourite not in options or len(options) == 1:
        return _uniform(len(options))
    rest = 0.5 / (len(options) - 1)
    return [0.5 if o == favourite else rest for o in options]


def schedule_gemv(sch: s_tir.Schedule, *, variant: str = "x_global", quantized: bool | None = None):
    """Apply the tunable GEMV schedule to ``sch`` in place.

    Parameters
    ----------
    sch : tvm.s_tir.Schedule
        A traced schedule of an unscheduled GEMV-like function.
    variant : {"x_global", "x_shared"}
        Where each thread reads its activation chunk from.
    quantized : bool, optional
        Whether the weight is packed 4-bit (vector choices in units of 8 elements); detected
        from the number of weight operands when ``None``.

    Raises
    ------
    NotApplicable
        If the function is not a K-innermost GEMV.
    """
    if variant not in GEMV_VARIANTS:
        raise ValueError(f"variant must be one of {GEMV_VARIANTS}, got {variant!r}")
    g = normalize_gemv(sch)
    if quantized is None:
        quantized = len(g.w_indices) > 1
    main = g.main

    # ---- knobs ----------------------------------------------------------------------------
    # wide loads are what a memory-bound GEMV wants: lean the draws towards them
    if quantized:
        vec = sch.sample_categorical([8, 16, 32], [0.3, 0.4, 0.3])
    else:
        vec = sch.sample_categorical([1, 2, 4, 8], [0.1, 0.1, 0.2, 0.6])
    ts = sch.sample_categorical([1, 2, 4, 8, 16], _uniform(5))
    tile_n = sch.sample_categorical([1, 2, 4], _uniform(3))
    unroll = sch.sample_categorical(_UNROLL, _uniform(len(_UNROLL)))
    # Threads along K: warp-friendly widths that divide K / (widest vector), hence K / vec for
    # every vector choice (no tail, no odd widths such as 12 that waste lanes and shuffles).
    # (q4f16_1: vectors of up to 32 halves leave too few such divisors; a perfect tile of K/vec.)
    k_ext, b_ext = _extent(sch.get(g.k).extent), _extent(sch.get(g.b).extent)
    tr_opts = [t for t in (8, 16, 32, 64, 128) if k_ext and (k_ext // 8) % t == 0]
    tr = sch.sample_categorical(tr_opts, _lean_to(tr_opts, 32)) if tr_opts and not quantized else None
    # Batch rows per block: the whole batch (one weight read per step) is the usual winner.
    b_opts = [d for d in (1, 2, 4, 8, 16, 32, 64) if b_ext and b_ext % d == 0] or [1]
    b_outer = sch.sample_categorical(b_opts, _lean_to(b_opts, 1))

    # ---- tiling ---------------------------------------------------------------------------
    bo, bi = sch.split(g.b, [b_outer, None], preserve_unit_iters=True)
    nb, nts, ntile = sch.split(g.n, [None, ts, tile_n], preserve_unit_iters=True)
    ko, kvec = sch.split(g.k, [None, vec], preserve_unit_iters=True)
    tr_tile = [None, tr] if tr is not None else sch.sample_perfect_tile(ko, n=2, max_innermost_factor=128)
    ko, ktr = sch.split(ko, tr_tile, preserve_unit_iters=True)
    sch.reorder(nb, bo, nts, ktr, ko, bi, ntile, kvec)

    # partial sums per K-thread, then a cross-thread reduction over threadIdx.x
    rf = sch.rfactor(ktr, factor_axis=0)
    rnb, rbo, rnts, rtr, rko, _, _, _ = sch.get_loops(rf)
    sch.bind(rnb, "blockIdx.x")
    sch.bind(rbo, "blockIdx.y")
    sch.bind(rnts, "threadIdx.y")
    sch.bind(rtr, "threadIdx.x")
    sch.reverse_compute_at(main, rnts, preserve_unit_loops=True)
    # the write-back's loops follow its iters: (tr, [b], n); no b iter for a single row
    l_tr, *l_rest = sch.get_loops(main)[3:]
    sch.reorder(*l_rest, l_tr)
    sch.bind(l_tr, "threadIdx.x")
    if g.epilogue is not None:
        sch.reverse_compute_at(g.epilogue, rnts, preserve_unit_loops=True)
        sch.set_scope(main, 0, "local")
    sch.set_scope(rf, 0, "local")

    # ---- operand caches ---------------------------------------------------------------------
    # Cache the weights first: cache_read shifts nothing (indices refer to rf's reads).
    for wi in g.w_indices:
        w_local = sch.cache_read(rf, wi, "local")
        sch.compute_at(w_local, rko, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(w_local)[-1])
    x_local = sch.cache_read(rf, g.x_index, "local")
    sch.compute_at(x_local, rko, preserve_unit_loops=True)
    x_vec = sch.get_loops(x_local)[-1]
    if quantized:  # vec is 8..32 halves; load in 16-byte pieces
        _, x_vec = sch.split(x_vec, [None, 8], preserve_unit_iters=True)
    sch.vectorize(x_vec)
    if variant == "x_shared":
        x_shared = sch.cache_read(x_local, 0, "shared")
        sch.compute_at(x_shared, rko, preserve_unit_loops=True)
        # The annotation value must be a sampled variable: a constant would come back from the
        # database's JSON as a plain int, which RewriteCooperativeFetch rejects on replay.
        fetch_vec = vec if not quantized else sch.sample_categorical([2, 4, 8], _uniform(3))
        sch.annotate(x_shared, "meta_schedule.cooperative_fetch", fetch_vec)

    sch.decompose_reduction(rf, rko)
    sch.annotate(rf, "meta_schedule.unroll_explicit", unroll)
    return sch
