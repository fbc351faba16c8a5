"""Tunable tensor-core design space for prefill GEMMs (fp16, and dequantize-fused q4f16_1).

The structure is dlight's ``MatmulTensorization`` (wmma 16x16x16 fragments, operands staged in
dynamic shared memory, accumulators written back through shared memory with the epilogue —
bias, GELU, residual add — inlined into that store) with its constants opened:

=======================  ==========================================  ==========================
knob                     instruction                                  dlight's fixed choice
=======================  ==========================================  ==========================
warps along M / N        ``sample_categorical`` 1, 2, 4 each          4 x 4 (16 warps)
wmma tiles per warp      ``sample_categorical`` 1, 2, 4 each          2 x 2 (warp tile 32x32)
along M / N              (block tile = 16 x warps x tiles, ≤ 256)
K chunk per stage        ``sample_categorical`` 1, 2, 4 (x16)         4 (64)
vector width of the      ``sample_categorical`` 2, 4, 8 halves        4
global→shared copies
and of the store
software pipeline        two design spaces: 2-stage pipeline          pipelined
                         (double-buffered shared + fragments) or none
=======================  ==========================================  ==========================

M and N are padded to multiples of 128 and K to 64 (``pad_einsum``, as dlight does), which
covers the lm_head's N = 50257: padded operand reads are predicated inside the shared-memory
copies, and the padded rows/columns never reach the output. N is padded to 256 instead where
128 leaves an odd number of 128-column tiles (the lm_head: 50257 -> 50432, not 50304; see
:func:`pad_n`): a 256-wide block tile (4 warps x 4 fragments) that does not divide the padded N
makes the tensorization of the B fragment load fail with an internal check of TVM's
``TensorizeComparator`` (``rhs_buffer_map_.count(desc)``), not a ``ScheduleError`` — a hard
error that aborts MetaSchedule's whole search round instead of rejecting the sample. GPT-2's
other N (768, 2304, 3072) are multiples of 256: their spaces are unchanged.
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

__all__ = ["GEMM_VARIANTS", "MAX_BLOCK_N", "pad_n", "schedule_gemm_tensorcore"]

#: The structural variants (one design space each).
GEMM_VARIANTS = ("pipelined", "plain")

_PAD = (1, 128, 128, 64)

#: The largest block tile along N: 16 x warps (<= 4) x wmma tiles per warp (<= 4).
MAX_BLOCK_N = 256


def pad_n(extent) -> int:
    """Multiple the (normalized) N extent is padded to: 128 as dlight, or :data:`MAX_BLOCK_N`
    where the 128-padded extent is not a multiple of it (every sampled block tile along N then
    divides the padded N). A symbolic extent keeps 128."""
    try:
        n = int(extent)
    except TypeError:
        return _PAD[2]
    tiles = -(-n // _PAD[2])
    return MAX_BLOCK_N if (tiles * _PAD[2]) % MAX_BLOCK_N else _PAD[2]


def normalize_matmul(sch: s_tir.Schedule, main) -> None:
    """Rewrite the matmul block ``main`` to ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` (as dlight):
    reindexed operands and output, layouts transformed to the canonical index maps. Shared by the
    wmma and the mma.sync spaces (the primitives, in this order, are part of their traces)."""
    reindex_a = sch.reindex(main, ("read", 0))
    reindex_b = sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)


def tile_16x16x16(sch: s_tir.Schedule, main):
    """Split the (padded, normalized) matmul's I, J, K by 16 and blockize the 16x16x16 tile the
    tensor-core intrinsics replace: returns ``(batch, i, j, k, block_outer)``."""
    batch, i, j, k = sch.get_loops(main)
    i, i_in = sch.split(i, [None, 16], preserve_unit_iters=True)
    j, j_in = sch.split(j, [None, 16], preserve_unit_iters=True)
    k, k_in = sch.split(k, [None, 16], preserve_unit_iters=True)
    sch.reorder(i, j, k, i_in, j_in, k_in)
    return batch, i, j, k, sch.blockize(i_in)


def schedule_gemm_tensorcore(sch: s_tir.Schedule, *, variant: str = "pipelined"):
    """Apply the tunable tensor-core GEMM schedule to ``sch`` in place.

    Parameters
    ----------
    sch : tvm.s_tir.Schedule
        A traced schedule of an unscheduled fp16 matmul-like function.
    variant : {"pipelined", "plain"}
        With or without the two-stage software pipeline over K.

    Raises
    ------
    NotApplicable
        If the function is not an fp16 matmul with one reduction block.
    """
    preload_tensor_intrinsics()
    # After the fast preload: importing tvm.s_tir.tensor_intrin first costs ~45 s (see tuning.intrinsics).
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group  # pylint: disable=import-outside-toplevel

    if variant not in GEMM_VARIANTS:
        raise ValueError(f"variant must be one of {GEMM_VARIANTS}, got {variant!r}")
    root = sch.get_sblock("root", func_name="main")
    red = get_reduction_blocks(sch, sch.get_child_blocks(root))
    if red is None:
        raise NotApplicable("expected exactly one reduction block")
    main = red[0]
    stmt = sch.get(main)
    if get_index_map(stmt) is None:
        raise NotApplicable("not a matmul")
    in_dtype = str(stmt.reads[0].source.dtype)
    acc_dtype = str(stmt.writes[0].source.dtype)
    if in_dtype != "float16" or str(stmt.reads[1].source.dtype) != "float16":
        raise NotApplicable(f"tensor-core space needs float16 operands, got {in_dtype}")
    if acc_dtype not in ("float16", "float32"):
        raise NotApplicable(f"unsupported accumulator dtype {acc_dtype}")

    # ---- normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] and pad (as dlight) ---------------
    normalize_matmul(sch, main)
    n_extent = sch.get(main).iter_vars[2].dom.extent
    sch.pad_einsum(main, [_PAD[0], _PAD[1], pad_n(n_extent), _PAD[3]])
    batch, i, j, k, block_outer = tile_16x16x16(sch, main)
    block_inner = main

    # ---- knobs ----------------------------------------------------------------------------
    warps_i = sch.sample_categorical([1, 2, 4], _uniform(3))
    warps_j = sch.sample_categorical([1, 2, 4], _uniform(3))
    tiles_i = sch.sample_categorical([1, 2, 4], _uniform(3))
    tiles_j = sch.sample_categorical([1, 2, 4], _uniform(3))
    k_chunk = sch.sample_categorical([1, 2, 4], _uniform(3))
    vec = sch.sample_categorical([2, 4, 8], _uniform(3))

    i0, i1, i2, i3 = sch.split(i, [None, 1, warps_i, tiles_i], preserve_unit_iters=True)
    j0, j1, j2, j3 = sch.split(j, [1, None, warps_j, tiles_j], preserve_unit_iters=True)
    k0, k1 = sch.split(k, [None, k_chunk], preserve_unit_iters=True)
    if variant == "pipelined":
        sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
        sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
    block_x = sch.fuse(i0, j0)
    block_y = sch.fuse(i1, j1)
    warp_y = sch.fuse(j2, i2)
    sch.bind(batch, "blockIdx.z")
    sch.bind(block_x, "blockIdx.x")
    sch.bind(block_y, "blockIdx.y")
    sch.bind(warp_y, "threadIdx.y")

    def fetch_to_shared(index: int):
        block_read = sch.cache_read(block_outer, index, "shared.dyn")
        sch.compute_at(block_read, k0)
        fused = sch.fuse(*sch.get_loops(block_read)[-2:])
        _, f_wj, f_wi, f_tx, f_vec = sch.split(fused, [None, warps_j, warps_i, 32, vec])
        sch.bind(sch.fuse(f_wj, f_wi), "threadIdx.y")
        sch.bind(f_tx, "threadIdx.x")
        sch.vectorize(f_vec)
        sch.storage_align(block_read, 0, axis=-2, factor=16, offset=8)
        sch.annotate(block_read, "tirx.manifest_shared_memory_local_stage", 1)
        if variant == "pipelined":
            sch.annotate(block_read, "double_buffer_scope", 0)
        return block_read

    a_g2s = fetch_to_shared(0)
    b_g2s = fetch_to_shared(1)
    auto_inline_producers(sch, a_g2s)
    auto_inline_producers(sch, b_g2s)

    a_frag = sch.cache_read(block_outer, 0, "wmma.matrix_a")
    b_frag = sch.cache_read(block_outer, 1, "wmma.matrix_b")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)

    acc_s2g = sch.cache_write(block_outer, 0, "shared.dyn")
    sch.storage_align(acc_s2g, 0, -2, 16, 4)
    store = sch.cache_write(block_outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, warp_y)
    sch.reverse_compute_at(acc_s2g, warp_y)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, [None, 16])
    sj0, sj1 = sch.split(sj, [None, 16])
    sch.reorder(si0, sj0, si1, sj1)

    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    intrins = get_wmma_intrin_group(
        load_scope="shared.dyn",
        store_scope="shared.dyn",
        in_dtype="float16",
        out_dtype=acc_dtype,
        trans_b=True,
    )
    for frag, key in ((a_frag, "load_a"), (b_frag, "load_b")):
        fi, fj = sch.get_loops(frag)[-2:]
        fi0, fi1 = sch.split(fi, [None, 16])
        fj0, fj1 = sch.split(fj, [None, 16])
        sch.reorder(fi0, fj0, fi1, fj1)
        sch.unroll(fi0)
        sch.unroll(fj0)
        sch.tensorize(fi1, intrins[key])
    sch.tensorize(sch.get_loops(init_inner)[-2], intrins["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrins["store"])
    sch.tensorize(sch.get_loops(block_inner)[-3], intrins["compute"])

    auto_inline_consumer_chain(sch, acc_s2g)
    fused = sch.fuse(*sch.get_loops(acc_s2g)[-2:])
    _, f_tx, f_vec = sch.split(fused, [None, 32, vec])
    sch.bind(f_tx, "threadIdx.x")
    sch.vectorize(f_vec)
    return sch


def is_tensorcore_target(target) -> bool:
    """Whether ``target`` is CUDA with tensor cores (sm_70 or newer)."""
    if target.kind.name != "cuda":
        return False
    arch = str(target.attrs.get("arch", ""))
    try:
        return int(arch.replace("sm_", "").rstrip("a")) >= 70
    except ValueError:
        return False

