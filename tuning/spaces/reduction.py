"""Tunable design spaces for fused row reductions (layer norm, softmax) and elementwise kernels.

Row reductions follow dlight's ``GeneralReduction``: one block per row, the row's reduction
stages computed into shared memory by a cross-thread reduction, then the final elementwise stage
over the same threads. Opened knobs:

==================  =====================================  ==========================
knob                instruction                             dlight's fixed choice
==================  =====================================  ==========================
threads per row     ``sample_categorical`` 32..1024         256
unroll of the       ``sample_categorical`` 0, 16, 64, 256   256
per-thread loops
==================  =====================================  ==========================

Elementwise kernels follow dlight's ``Fallback`` (everything inlined into the last stage, one
flat thread grid) with the block size opened (64..1024, dlight: the target maximum) and a
vector width (1, 2, 4, 8 elements per thread; non-dividing widths are predicated).
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline, try_inline_contiguous_spatial

from ._analysis import NotApplicable
from ._analysis import uniform as _uniform

__all__ = ["schedule_elementwise", "schedule_row_reduction"]

_THREADS = [32, 64, 128, 256, 512, 1024]


def schedule_row_reduction(sch: s_tir.Schedule):
    """Apply the tunable row-reduction schedule to ``sch`` in place.

    Raises
    ------
    NotApplicable
        Unless the function is reduction stages over the trailing axes followed by one
        elementwise stage of the same rank (layer norm, softmax).
    """
    infos = normalize_prim_func(sch)
    infos = try_inline_contiguous_spatial(sch, infos)
    if not infos or len(infos) < 2:
        raise NotApplicable("expected reduction stages followed by an elementwise stage")
    dom_kind = infos[0].dom_kind()
    num_leading_s = len(dom_kind) - len(dom_kind.lstrip("S"))
    num_trailing_r = len(dom_kind) - len(dom_kind.rstrip("R"))
    last = infos[-1]
    if (
        num_trailing_r == 0
        or any(b.dom_kind() != dom_kind for b in infos[:-1])
        or not last.is_injective()
        or not 0 <= len(dom_kind) - len(last.dom_kind()) <= num_leading_s
    ):
        raise NotApplicable(f"unsupported reduction pattern {[b.dom_kind() for b in infos]}")

    len_tx = sch.sample_categorical(_THREADS, _uniform(len(_THREADS)))
    unroll = sch.sample_categorical([0, 16, 64, 256], _uniform(4))

    loops = list(sch.get_loops(last.block_rv))
    # Unit row dims dropped from the last stage (a single row, e.g. decode batch 1): give it
    # unit loops in their place so its loops line up with the reduction stages'.
    for _ in range(len(dom_kind) - len(last.dom_kind())):
        unit = sch.add_unit_loop(last.block_rv)
        sch.reorder(unit, *loops)
        loops = [unit, *loops]
    lead = num_leading_s
    if lead == 0:  # no row dim at all: a unit loop to bind the grid to
        unit = sch.add_unit_loop(last.block_rv)
        sch.reorder(unit, *loops)
        loops, lead = [unit, *loops], 1
    bx = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
    r_loop = sch.fuse(*loops[lead:]) if len(loops) - lead > 1 else loops[-1]
    r_loop, tx = sch.split(r_loop, [None, len_tx])
    sch.reorder(tx, r_loop)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.annotate(r_loop, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(r_loop, "pragma_unroll_explicit", 1)
    for info in reversed(infos[:-1]):
        block = info.block_rv
        for i, _ in enumerate(sch.get(block).writes):
            sch.set_scope(block, buffer_index=i, storage_scope="shared")
        sch.compute_at(block, bx, preserve_unit_loops=True)
        r_loop = sch.fuse(*sch.get_loops(block)[-num_trailing_r:])
        r_loop, tx = sch.split(r_loop, [None, len_tx])
        sch.reorder(tx, r_loop)
        sch.bind(tx, "threadIdx.x")
        sch.annotate(r_loop, "pragma_auto_unroll_max_step", unroll)
        sch.annotate(r_loop, "pragma_unroll_explicit", 1)
    return sch


def schedule_elementwise(sch: s_tir.Schedule):
    """Apply the tunable elementwise schedule to ``sch`` in place.

    Raises
    ------
    NotApplicable
        If a block reduces or stages cannot be inlined into one.
    """
    infos = normalize_prim_func(sch)
    if infos is None:
        raise NotApplicable("function cannot be normalized")
    infos = try_inline(sch, infos)
    if len(infos) != 1 or not infos[0].is_injective():
        raise NotApplicable("expected a single elementwise stage after inlining")
    block = infos[0].block_rv
    threads = sch.sample_categorical([64, 128, 256, 512, 1024], _uniform(5))
    vec = sch.sample_categorical([1, 2, 4, 8], _uniform(4))
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx, v = sch.split(fused, [None, threads, vec])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)
    return sch
