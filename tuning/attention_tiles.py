"""TVMScript macros shared by the tensor-core prefill attention kernels (:mod:`tuning.attention_tc`,
wmma, and :mod:`tuning.attention_mma`, mma.sync): which (sequence, query tile) a block computes,
and the staging of that tile's queries into shared memory.
"""

from __future__ import annotations

__all__ = ["pick_tile_macro", "stage_q_macro"]


def pick_tile_macro(group: int, tq: int):
    """The macro both tensor-core kernels start with: which (sequence, query tile) block ``bx``
    computes, into ``st[0]`` (sequence, ``batch_size`` when none), ``st[1]`` (tile, counted from
    the sequence's last: the longest tiles start first) and ``st[2]`` (the sequence's tiles)."""
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    @T.macro
    def pick_tile(st: T.Buffer, q_indptr: T.Buffer, batch_size: T.int32, bx: T.int32):
        st[0] = 0
        st[1] = bx
        st[2] = T.ceildiv((q_indptr[1] - q_indptr[0]) * group, tq)
        while st[0] < batch_size and st[1] >= st[2]:
            st[1] = st[1] - st[2]
            st[0] = st[0] + 1
            if st[0] < batch_size:
                st[2] = T.ceildiv((q_indptr[st[0] + 1] - q_indptr[st[0]]) * group, tq)

    return pick_tile


def stage_q_macro(*, group: int, tq: int, d: int, nthr: int, stride: int, dtype: str):
    """The macro that stages a tile's ``tq`` query rows (of the (position, head-in-group) row space)
    into shared memory with 16-byte loads, rows ``stride`` elements apart, zeros past the sequence."""
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    vec = 8
    q_chunks = tq * d // vec

    @T.macro
    def stage_q(smem: T.Buffer, q: T.Buffer, q_start: T.int32, q_n: T.int32, row0: T.int32, by: T.int32,
                tid: T.int32):
        for c in T.unroll(T.ceildiv(q_chunks, nthr)):
            idx: T.let[T.int32] = c * nthr + tid
            if idx < q_chunks:
                r: T.let[T.int32] = idx // (d // vec)
                col: T.let[T.int32] = idx % (d // vec) * vec
                pos: T.let[T.int32] = (row0 + r) // group
                if pos < q_n:
                    smem[T.ramp(r * stride + col, 1, vec)] = q[q_start + pos, by * group + (row0 + r) % group,
                                                               T.ramp(col, 1, vec)]
                else:
                    smem[T.ramp(r * stride + col, 1, vec)] = T.broadcast(T.cast(0, dtype), vec)

    return stage_q
