"""Tunable ``mma.sync`` design space for prefill GEMMs: ldmatrix + m16n8k16 + cp.async pipeline.

MetaSchedule's ``MultiLevelTilingTensorCore`` yields an empty design space on GPT-2's GEMMs with
``get_mma_intrin_group`` and dlight only has wmma, so this space is written by hand (the
structure of ``tvm.testing.tir.mma_schedule``, MetaSchedule's software-pipeline annotations and
``gemm.py``'s epilogue handling):

* ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (GPT-2's weights are stored ``[N, K]``: B is
  "transposed" for ``mma``), padded with ``pad_einsum`` (covers the lm_head's N = 50257);
* each warp owns ``frags_i x frags_j`` 16x16 accumulator fragments in registers (``warp``
  scope, ``LowerWarpMemory``); each fragment is two ``mma.sync.m16n8k16`` per 16-wide K step,
  operands loaded from shared memory with ``ldmatrix.x4``;
* A and B tiles are staged in ``shared.dyn`` through a 2-, 3- or 4-stage software pipeline over K
  whose copy stage is asynchronous (``software_pipeline_async_stages``: ``cp.async`` +
  commit/wait groups, once the build runs ``InjectPTXAsyncCopy``, see below); the ldmatrix
  fragments are double-buffered by an inner pipeline (as ``MultiLevelTilingTensorCore`` does);
* shared tiles are either XOR-swizzled (``permuted_layout``: 16-byte chunks permuted per row,
  applied to both the cp.async stores and the ldmatrix addresses) or padded by 16 bytes per row
  (``storage_align``) — both make the eight 16-byte rows of an ``ldmatrix`` hit distinct banks;
* the accumulators go registers -> ``shared.dyn`` (per warp) -> global with the fused epilogue
  (bias, GELU, residual add) inlined into that vectorized store.

Knobs (``sample_categorical``; block tile = 16 x warps x fragments per dim):

=====================  ================  =========================================
knob                   choices           meaning
=====================  ================  =========================================
warps along M / N      1, 2, 4 each      threadIdx.y = warps_m x warps_n
fragments per warp     1, 2, 4 each      warp tile 16..64 per dim; block 16..256
K chunk per stage      2, 4 (x16)        32 or 64 halves of K per pipeline stage
copy / store vector    4, 8 halves       8 = 16-byte cp.async
=====================  ================  =========================================

Structural variants (one design space each): stages 2 or 3 x swizzle or padding, and 4 stages
with swizzle (long K: the MLP down projection, K = 3072).

No unroll knob: with TVM's explicit unrolling (``meta_schedule.unroll_explicit`` 16..512) nvcc
keeps the accumulator fragment in local memory (112-byte stack frame per thread, ptxas -v on
1024x768x2304); left to nvcc, every checked configuration has a 0-byte stack frame.

Accumulation dtype follows the kernel (GPT-2's fused ``NT_matmul`` blocks accumulate in
float16, as dlight's schedule does; a float32 accumulator uses the f32 intrinsics).

cp.async needs the build's ``PassContext`` config ``{"tirx.use_async_copy": True}`` (TVM runs
``InjectPTXAsyncCopy`` only then); without it the same kernel is built with synchronous copies
(still pipelined and correct). See :data:`ASYNC_COPY_CONFIG`.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)

from ..intrinsics import preload_tensor_intrinsics
from ._analysis import NotApplicable
from ._analysis import uniform as _uniform
from .gemm import normalize_matmul, tile_16x16x16

__all__ = [
    "ASYNC_COPY_CONFIG",
    "MMA_VARIANTS",
    "is_mma_target",
    "mma_pad",
    "schedule_gemm_mma",
]

#: The structural variants: (pipeline stages, shared layout).
MMA_VARIANTS = ("s3_swizzle", "s2_swizzle", "s3_pad", "s2_pad", "s4_swizzle")

#: PassContext config that makes TVM lower the pipeline's async copy stage to ``cp.async``.
ASYNC_COPY_CONFIG = {"tirx.use_async_copy": True}

_WARPS = [1, 2, 4]
_FRAGS = [1, 2, 4]
_K_CHUNK = [2, 4]
_VEC = [4, 8]
#: Skinny GEMMs: all rows in one block (warps along N only), and deeper K chunks (more bytes of
#: the weights in flight per block: a decode GEMM is bound by streaming them).
#: (8 warps x 4 fragments, a 512-wide tile, would not divide the padded N of 2304 or the lm_head.)
_SKINNY_WARPS_N = [1, 2, 4, 8]
_SKINNY_FRAGS_N = [1, 2]
_SKINNY_K_CHUNK = [2, 4, 8]


def _parse_variant(variant: str) -> tuple[int, bool]:
    if variant not in MMA_VARIANTS:
        raise ValueError(f"variant must be one of {MMA_VARIANTS}, got {variant!r}")
    stages, layout = variant.split("_")
    return int(stages[1:]), layout == "swizzle"


#: A GEMM with at most this many rows (decode at b8-b64) is *skinny*: its M is padded to a
#: multiple of 16 only and one block covers all rows (see :func:`schedule_gemm_mma`).
SKINNY_MAX_ROWS = 64


def mma_pad(extent: int, *, small: int = 128, large: int = 256) -> int:
    """Multiple an M/N extent is padded to.

    To 128, or to 256 when the extent is at least 1024 (then a 256-wide block tile divides it, at
    < 1 % extra work for the lm_head's 50257 -> 50432), or to 16 when it is at most
    :data:`SKINNY_MAX_ROWS` (decode rows: padding b32 to 128 would quadruple the work and split the
    rows over blocks that each re-read the weights). Extents that are already multiples are
    unchanged either way. (K is padded to the largest K chunk of the space.)
    """
    if extent <= SKINNY_MAX_ROWS:
        return 16
    return large if extent >= 1024 else small


def _static(e) -> int:
    try:
        return int(e)
    except TypeError as err:
        raise NotApplicable("the mma space needs static GEMM shapes") from err


# ------------------------------------------------------------------------------------------
# operand fragments in "local" scope (works around LowerWarpMemory in TVM 0.27)
# ------------------------------------------------------------------------------------------
#
# TVM 0.27.0.post1's ``LowerWarpMemory`` lowers only the *first* "warp"-scope allocation of a
# statement sequence: ``WarpMemoryRewriter`` rewrites it, hands the remaining siblings to a
# rewriter that knows only that buffer, and stops. With A, B and C fragments all in "warp" scope
# (TVM's mma intrinsics), A and B stay whole-warp arrays per thread addressed with
# ``threadIdx.x * 8`` (local memory; checked in the generated CUDA). Here only the accumulator C
# stays in "warp" scope (TVM's ``mma_fill`` / ``mma_store``); the A and B fragments use "local"
# scope with the same descriptions (same tensorize match) and impls that address a lane's own 8
# halves without the lane term: ``ldmatrix.x4`` writes them, the mma reads them. Their indices are
# compile-time constants once the fragment loops are unrolled (nvcc keeps them in registers).

LDMATRIX_A = "gpt2_mma_ldmatrix_f16_a_dyn_local"
LDMATRIX_B_TRANS = "gpt2_mma_ldmatrix_f16_b_trans_dyn_local"
#: Accumulators -> shared.dyn with ``mma_store`` (a lane stores its own 8 values; TVM's
#: "simple" variant reads the fragment with lane-dependent indices that LowerWarpMemory turns
#: into dynamically indexed local arrays + shuffles).
MMA_STORE = {"float16": "gpt2_mma_store_16x16_f16_shared_dyn",
             "float32": "gpt2_mma_store_16x16_f32_shared_dyn"}
MMA_TRANS_B = {"float16": "gpt2_mma_f16f16f16_trans_b_local_ab",
               "float32": "gpt2_mma_f16f16f32_trans_b_local_ab"}


def _ldmatrix_local(transposed_b: bool):
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    def smem_offset(tx, stride):
        if transposed_b:  # B stored [N, K]
            return stride * 8 * (tx // 16) + stride * (tx % 8) + 8 * ((tx % 16) // 8)
        return stride * (tx % 16) + 8 * (tx // 16)

    def index_map(i, j):
        return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + (j % 2)

    @T.prim_func(s_tir=True)
    def desc(frag_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (16, 16), "float16", align=64, offset_factor=16,
                                scope="shared.dyn")
        frag = T.match_buffer(frag_handle, (32, 8), "float16", align=64, offset_factor=16,
                              scope="local")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(frag[0:32, 0:8])
            for ax0, ax1 in T.grid(16, 16):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    T.reads(shared[v0, v1])
                    lane, e = T.meta_var(index_map(v0, v1))
                    T.writes(frag[lane, e])
                    frag[lane, e] = shared[v0, v1]

    @T.prim_func(s_tir=True)
    def impl(frag_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_handle, (16, 16), "float16", align=64, offset_factor=16,
                                scope="shared.dyn", strides=[s0, s1])
        frag = T.match_buffer(frag_handle, (32, 8), "float16", align=64, offset_factor=16,
                              scope="local")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(frag[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", frag.data,
                                                 frag.elem_offset // 32,
                                                 shared.access_ptr("r"), smem_offset(tx, s0),
                                                 dtype="float16"))

    return desc, impl


def _mma_local_ab(out_dtype: str):
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel
    from tvm.tirx import Cast  # pylint: disable=import-outside-toplevel

    def index_map(i, j):
        return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + (j % 2)

    def cast(v):
        return v if out_dtype == "float16" else Cast(out_dtype, v)

    abbrv = {"float16": "fp16", "float32": "fp32"}[out_dtype]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 8), "float16", align=64, offset_factor=16, scope="local")
        B = T.match_buffer(b, (32, 8), "float16", align=64, offset_factor=16, scope="local")
        C = T.match_buffer(c, (32, 8), out_dtype, align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:32, 0:8], B[0:32, 0:8])
            T.writes(C[0:32, 0:8])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, lc = T.meta_var(index_map(vi, vj))
                    ta, la = T.meta_var(index_map(vi, vk))
                    tb, lb = T.meta_var(index_map(vj, vk))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] += cast(A[ta, la]) * cast(B[tb, lb])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 8), "float16", align=64, offset_factor=16, scope="local")
        B = T.match_buffer(b, (32, 8), "float16", align=64, offset_factor=16, scope="local")
        C = T.match_buffer(c, (32, 8), out_dtype, align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:32, 0:8], B[0:32, 0:8])
            T.writes(C[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", abbrv,
                                            A.data, A.elem_offset // 32,
                                            B.data, B.elem_offset // 32,
                                            C.data, C.elem_offset + tx * 8, False,
                                            dtype=out_dtype))
                T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", abbrv,
                                            A.data, A.elem_offset // 32,
                                            B.data, B.elem_offset // 32 + 4,
                                            C.data, C.elem_offset + tx * 8 + 4, False,
                                            dtype=out_dtype))

    return desc, impl


def _register_intrinsics() -> None:
    from tvm.s_tir import TensorIntrin  # pylint: disable=import-outside-toplevel

    from tvm.s_tir.tensor_intrin.cuda import get_mma_store_intrin

    todo = [(LDMATRIX_A, lambda: _ldmatrix_local(False)),
            (LDMATRIX_B_TRANS, lambda: _ldmatrix_local(True))]
    todo += [(name, (lambda d=d: get_mma_store_intrin(d, 8, "shared.dyn", True)))
             for d, name in MMA_STORE.items()]
    todo += [(name, (lambda d=d: _mma_local_ab(d))) for d, name in MMA_TRANS_B.items()]
    for name, make in todo:
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *make())


def _warp_layout(b, i, j):
    """(b, i, j) -> (b, i/16, j/16, lane, element): the ldmatrix / mma fragment layout."""
    from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout

    return (b, i // 16, j // 16, *shared_16x16_to_ldmatrix_32x8_layout(i % 16, j % 16))


def schedule_gemm_mma(sch: s_tir.Schedule, *, variant: str = "s3_swizzle"):
    """Apply the tunable mma.sync GEMM schedule to ``sch`` in place.

    Parameters
    ----------
    sch : tvm.s_tir.Schedule
        A traced schedule of an unscheduled fp16 matmul-like function (static shapes).
    variant : str
        One of :data:`MMA_VARIANTS`: pipeline depth (``s2``/``s3``/``s4``) and shared-memory layout
        (``swizzle``: XOR-permuted 16-byte chunks; ``pad``: rows padded by 16 bytes).

    Raises
    ------
    NotApplicable
        If the function is not a static fp16 matmul with one reduction block.
    ValueError
        For an unknown ``variant``.
    """
    stages, swizzle = _parse_variant(variant)
    preload_tensor_intrinsics()
    _register_intrinsics()
    from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group

    root = sch.get_sblock("root", func_name="main")
    red = get_reduction_blocks(sch, sch.get_child_blocks(root))
    if red is None:
        raise NotApplicable("expected exactly one reduction block")
    main = red[0]
    stmt = sch.get(main)
    if get_index_map(stmt) is None:
        raise NotApplicable("not a matmul")
    if len(stmt.reads) != 2:
        raise NotApplicable("expected a matmul reading two operands")
    if any(str(r.source.dtype) != "float16" for r in stmt.reads):
        raise NotApplicable("the mma space needs float16 operands")
    acc_dtype = str(stmt.writes[0].source.dtype)
    if acc_dtype not in ("float16", "float32"):
        raise NotApplicable(f"unsupported accumulator dtype {acc_dtype}")

    # ---- normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] and pad ------------------------
    normalize_matmul(sch, main)
    dom = [_static(iv.dom.extent) for iv in sch.get(main).iter_vars]
    if len(dom) != 4:
        raise NotApplicable("unexpected matmul iteration space")
    _, m, n, k = dom
    skinny = m <= SKINNY_MAX_ROWS
    k_chunks = _SKINNY_K_CHUNK if skinny else _K_CHUNK
    sch.pad_einsum(main, [1, mma_pad(m), mma_pad(n), 16 * max(k_chunks)])

    batch, i, j, k, block_outer = tile_16x16x16(sch, main)
    block_inner = main

    # ---- knobs ----------------------------------------------------------------------------
    if skinny:
        # skinny (decode b8-b64): one block row holds every (padded) row, each warp all of them
        # (m/16 fragments along M), so every block streams its own slice of the weights once
        warps_i, frags_i = 1, -(-m // 16)
        warps_j = sch.sample_categorical(_SKINNY_WARPS_N, _uniform(len(_SKINNY_WARPS_N)))
        frags_j = sch.sample_categorical(_SKINNY_FRAGS_N, _uniform(len(_SKINNY_FRAGS_N)))
        k_chunk = sch.sample_categorical(k_chunks, _uniform(len(k_chunks)))
    else:
        warps_i = sch.sample_categorical(_WARPS, _uniform(len(_WARPS)))
        warps_j = sch.sample_categorical(_WARPS, _uniform(len(_WARPS)))
        frags_i = sch.sample_categorical(_FRAGS, _uniform(len(_FRAGS)))
        frags_j = sch.sample_categorical(_FRAGS, _uniform(len(_FRAGS)))
        k_chunk = sch.sample_categorical(k_chunks, _uniform(len(k_chunks)))
    vec = sch.sample_categorical(_VEC, _uniform(len(_VEC)))

    i0, i1, i2 = sch.split(i, [None, warps_i, frags_i], preserve_unit_iters=True)
    j0, j1, j2 = sch.split(j, [None, warps_j, frags_j], preserve_unit_iters=True)
    k0, k1 = sch.split(k, [None, k_chunk], preserve_unit_iters=True)
    sch.reorder(i0, j0, j1, i1, k0, k1, i2, j2)
    sch.bind(batch, "blockIdx.z")
    sch.bind(i0, "blockIdx.y")
    sch.bind(j0, "blockIdx.x")
    warp = sch.fuse(j1, i1)
    sch.bind(warp, "threadIdx.y")

    # ---- global -> shared.dyn (cp.async stage of the pipeline) ------------------------------
    def fetch_to_shared(index: int):
        block_read = sch.cache_read(block_outer, index, "shared.dyn")
        sch.compute_at(block_read, k0)
        fused = sch.fuse(*sch.get_loops(block_read)[-2:])
        _, f_wj, f_wi, f_tx, f_vec = sch.split(fused, [None, warps_j, warps_i, 32, vec])
        sch.bind(sch.fuse(f_wj, f_wi), "threadIdx.y")
        sch.bind(f_tx, "threadIdx.x")
        sch.vectorize(f_vec)
        if swizzle:
            sch.annotate(block_read, "permuted_layout", 1)
        else:
            sch.storage_align(block_read, 0, axis=-2, factor=32, offset=8)
        return block_read

    a_g2s = fetch_to_shared(0)
    b_g2s = fetch_to_shared(1)
    auto_inline_producers(sch, a_g2s)
    auto_inline_producers(sch, b_g2s)

    # ---- shared.dyn -> registers (ldmatrix) -------------------------------------------------
    a_frag = sch.cache_read(block_outer, 0, "local")
    b_frag = sch.cache_read(block_outer, 1, "local")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)

    # ---- registers -> shared.dyn -> global with the epilogue --------------------------------
    acc_s2g = sch.cache_write(block_outer, 0, "shared.dyn")
    sch.storage_align(acc_s2g, 0, axis=-2, factor=32, offset=8)
    store = sch.cache_write(block_outer, 0, "warp")
    sch.reverse_compute_at(store, warp)
    sch.reverse_compute_at(acc_s2g, warp)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, [None, 16])
    sj0, sj1 = sch.split(sj, [None, 16])
    sch.reorder(si0, sj0, si1, sj1)

    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    def tile_fragment(frag):
        fi, fj = sch.get_loops(frag)[-2:]
        fi0, fi1 = sch.split(fi, [None, 16])
        fj0, fj1 = sch.split(fj, [None, 16])
        sch.reorder(fi0, fj0, fi1, fj1)
        return fi1

    loop_a = tile_fragment(a_frag)
    loop_b = tile_fragment(b_frag)
    sch.transform_layout(a_frag, ("write", 0), _warp_layout)
    sch.transform_layout(b_frag, ("write", 0), _warp_layout)
    sch.transform_layout(store, ("read", 0), _warp_layout)

    intrins = get_mma_intrin_group(
        load_scope="shared.dyn",
        store_scope="shared.dyn",
        in_dtype="float16",
        out_dtype=acc_dtype,
        trans_a=False,
        trans_b=True,
    )
    ld_a = sch.blockize(loop_a)
    ld_b = sch.blockize(loop_b)
    if swizzle:  # the ldmatrix addresses follow the permuted layout of the stores
        sch.annotate(ld_a, "permuted_layout", 1)
        sch.annotate(ld_b, "permuted_layout", 1)
    sch.tensorize(ld_a, LDMATRIX_A)
    sch.tensorize(ld_b, LDMATRIX_B_TRANS)
    sch.tensorize(sch.get_loops(block_inner)[-3], MMA_TRANS_B[acc_dtype])
    sch.tensorize(sch.get_loops(init_inner)[-2], intrins["init"])
    sch.tensorize(sch.get_loops(store)[-2], MMA_STORE[acc_dtype])

    # ---- software pipeline (MultiLevelTilingTensorCore's annotations, async copy stage) -----
    # k1 body: [A ldmatrix, B ldmatrix, mma]: prefetch the next fragments (registers x 2).
    # The inner pipeline is injected first, so k0's body is then [A g2s, B g2s, k1 prologue
    # (first ldmatrix), k1 body, k1 epilogue]; the copies run stages - 1 tiles ahead and the
    # whole inner pipeline consumes one tile. (MultiLevelTilingTensorCore's [0, 0, 1, 2, 2] /
    # order [0, 1, 3, 2, 4] loads the next tile's first fragments before the current tile's
    # last mma, but then the async wait for tile t + 1 lands before the mma of tile t:
    # ``cp.async.wait_group 0`` with 2 stages, i.e. no copy/compute overlap at all.)
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k0, "software_pipeline_stage", [0, 0, stages - 1, stages - 1, stages - 1])
    sch.annotate(k0, "software_pipeline_order", [0, 1, 2, 3, 4])
    sch.annotate(k0, "software_pipeline_async_stages", [0])

    auto_inline_consumer_chain(sch, acc_s2g)
    fused = sch.fuse(*sch.get_loops(acc_s2g)[-2:])
    _, f_tx, f_vec = sch.split(fused, [None, 32, vec])
    sch.bind(f_tx, "threadIdx.x")
    sch.vectorize(f_vec)
    return sch


def is_mma_target(target) -> bool:
    """Whether ``target`` is CUDA with ``mma.sync.m16n8k16`` + ``ldmatrix`` + ``cp.async``
    (sm_80 or newer)."""
    if target.kind.name != "cuda":
        return False
    arch = str(target.attrs.get("arch", ""))
    try:
        return int(arch.replace("sm_", "").rstrip("a")) >= 80
    except ValueError:
        return False
