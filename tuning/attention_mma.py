"""The mma.sync variant of the tensor-core ``batch_prefill_ragged_kv`` (``TCConfig(mma=True)``).

:mod:`tuning.attention_tc` stages the scores of a key step through shared memory between its two
wmma products (wmma fragments have no defined register layout, so the softmax cannot touch
them). This variant uses PTX ``mma.sync.m16n8k16`` instead, whose fragment layouts are specified,
and keeps S, P and O in registers (FlashAttention-2's arrangement, below). Same signature,
semantics and search as the wmma kernel; :func:`tuning.attention_tc.make_tc_ragged_prefill`
dispatches here for ``mma=True`` after the legality check.

Knobs (``TCConfig``): warps (16 query rows each), key tile, K/V prefetch into registers, and
``stages=2``: K/V double-buffered in shared memory, the next tile stored into the other buffer after
this one's products (TVM's ThreadSync still adds a barrier before that store: it does not tell the
buffer halves apart).

Verification: the search's NumPy check on the GPU, and on machines without one
``tests/tuning/test_attention_mma_emulated.py`` (the generated CUDA run on the CPU through an
emulation of threads, barriers, shuffles and ``mma.sync``). Fragment arrays must be written element
by element: a vectorized store makes TVM declare the array ``half2``, and the ``mma`` operand
offsets (counted in the array's elements) then point twice as far (the fault of the first H200 run,
2026-12-02).
"""

from __future__ import annotations

import math

from .attention_tiles import pick_tile_macro, stage_q_macro

__all__ = ["make_mma_ragged_prefill"]

_LOG2E = math.log2(math.e)


def make_mma_ragged_prefill(cfg, key):  # pylint: disable=too-many-locals,too-many-statements
    """``batch_prefill_ragged_kv`` with ``mma.sync.m16n8k16`` and the softmax in registers.

    The FlashAttention-2 arrangement: a warp owns 16 query rows; its Q fragments, the scores S of
    a key step, the probabilities P and the output O stay in registers in the PTX fragment
    layouts. For lane ``t`` (``g = t // 4``, ``c = t % 4``) an accumulator tile of 16 x 8 holds rows
    ``g`` and ``g + 8``, columns ``2c, 2c + 1``; the row maximum and sum of the online softmax are
    combined over the four lanes of a row (shuffles with lane masks 1 and 2), and P's accumulator
    tiles 2k, 2k + 1 are exactly the A fragment of key step k of P V (no shared-memory round trip,
    no barrier between the two products). K is staged row-major (the B operand of Q Kᵀ), V
    transposed (the B operand of P V); rows are padded by 8 halves, so the 32-bit fragment loads
    of a warp hit 32 different banks.
    """
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    h_kv, h_q, d, dtype = key.h_kv, key.h_q, key.d, key.dtype
    group = h_q // h_kv
    nw, tk = cfg.num_warps, cfg.tile_k
    tq = 16 * nw
    nthr = 32 * nw
    dp = d + 8  # Q / K row stride (halves)
    tkp = tk + 8  # Vᵀ row stride (halves)
    nd16, nd8 = d // 16, d // 8  # k-steps of Q Kᵀ over d; n-tiles of P V over d
    nk8, nk16 = tk // 8, tk // 16  # n-tiles of S over the keys; k-steps of P V over the keys
    vec = 8  # fp16 elements per 16-byte load
    kv_chunks = tk * d // vec
    pick_tile = pick_tile_macro(group, tq)
    stage_q = stage_q_macro(group=group, tq=tq, d=d, nthr=nthr, stride=dp, dtype=dtype)
    n_ld = -(-kv_chunks // nthr)
    stages = cfg.stages  # 2: K/V double-buffered in shared memory (register staging, one barrier per step)
    prefetch = cfg.prefetch or stages == 2
    scale_log2 = _LOG2E
    f32 = "float32"

    def mma(a_buf, a_off, b_buf, c_buf, c_off):
        return T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32", a_buf.data, a_off,
                                           b_buf.data, 0, c_buf.data, c_off, False, dtype=f32))

    def combine(x, lane_mask, is_max):  # x with the lane ``lane ^ lane_mask``'s x: max or sum
        other = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), x, lane_mask, 32, 32)
        return T.max(x, other) if is_max else x + other

    # pylint: disable=invalid-name,unused-variable
    @T.macro
    def load_kv(kv_reg: T.Buffer, k: T.Buffer, v: T.Buffer, kv_start: T.int32, kv_n: T.int32, by: T.int32,
                tid: T.int32, it: T.int32):
        # K: lanes along a row (coalesced); V: lanes along the keys (its transposed stores are conflict-free)
        for c in T.unroll(n_ld):
            if c * nthr + tid < kv_chunks:
                rk: T.let[T.int32] = (c * nthr + tid) // (d // vec)
                ck: T.let[T.int32] = (c * nthr + tid) % (d // vec) * vec
                rv: T.let[T.int32] = (c * nthr + tid) % tk
                cv: T.let[T.int32] = (c * nthr + tid) // tk * vec
                if it * tk + rk < kv_n:
                    kv_reg[T.ramp(c * vec, 1, vec)] = k[kv_start + it * tk + rk, by, T.ramp(ck, 1, vec)]
                else:
                    kv_reg[T.ramp(c * vec, 1, vec)] = T.broadcast(T.cast(0, dtype), vec)
                if it * tk + rv < kv_n:
                    kv_reg[T.ramp((n_ld + c) * vec, 1, vec)] = v[kv_start + it * tk + rv, by, T.ramp(cv, 1, vec)]
                else:
                    kv_reg[T.ramp((n_ld + c) * vec, 1, vec)] = T.broadcast(T.cast(0, dtype), vec)

    @T.macro
    def store_kv(kv_reg: T.Buffer, K_smem: T.Buffer, Vt_smem: T.Buffer, tid: T.int32, stage: T.int32):
        # K row-major (16-byte stores), V transposed (the B operand of P V), into buffer ``stage``
        for c in T.unroll(n_ld):
            if c * nthr + tid < kv_chunks:
                K_smem[T.ramp(stage * (tk * dp) + (c * nthr + tid) // (d // vec) * dp + (c * nthr + tid) % (d // vec) * vec,
                              1, vec)] = kv_reg[T.ramp(c * vec, 1, vec)]
                for e in T.unroll(vec):
                    Vt_smem[stage * (d * tkp) + ((c * nthr + tid) // tk * vec + e) * tkp + (c * nthr + tid) % tk] = \
                        kv_reg[(n_ld + c) * vec + e]

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(  # pylint: disable=too-many-branches,too-many-arguments
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle,
        var_lse: T.handle, causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
        rope_theta: T.float32, sm_scale: T.float32,
    ):
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",
                                         elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                           elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        T.func_attr({"tirx.is_scheduled": True})
        assert rotary_mode == 0, "tensor-core batch_prefill_ragged_kv: rotary_mode must be 0 (no RoPE in the kernel)"
        for bx in T.thread_binding(T.ceildiv(qo_len * group, tq) + batch_size, thread="blockIdx.x"):
            for by in T.thread_binding(h_kv, thread="blockIdx.y"):
                for ty in T.thread_binding(nw, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("attn"):
                            T.reads()
                            T.writes()
                            Q_smem = T.sblock_alloc_buffer((tq * dp,), dtype, scope="shared")
                            K_smem = T.sblock_alloc_buffer((stages * tk * dp,), dtype, scope="shared")
                            Vt_smem = T.sblock_alloc_buffer((stages * d * tkp,), dtype, scope="shared")
                            qf = T.sblock_alloc_buffer((nd16 * 8,), dtype, scope="local")
                            kb = T.sblock_alloc_buffer((4,), dtype, scope="local")
                            vb = T.sblock_alloc_buffer((4,), dtype, scope="local")
                            sacc = T.sblock_alloc_buffer((nk8 * 4,), f32, scope="local")
                            pf = T.sblock_alloc_buffer((nk16 * 8,), dtype, scope="local")
                            oacc = T.sblock_alloc_buffer((nd8 * 4,), f32, scope="local")
                            kv_reg = T.sblock_alloc_buffer((2 * n_ld * vec,), dtype, scope="local")
                            st = T.sblock_alloc_buffer((4,), "int32", scope="local")  # b, tile, tiles, n_kv
                            # per fragment row (g, g + 8): m, l, m_new, alpha, row sum of this step
                            sm = T.sblock_alloc_buffer((10,), f32, scope="local")

                            pick_tile(st, q_indptr, batch_size, bx)
                            if T.tvm_thread_invariant(st[0] < batch_size):
                                b: T.let[T.int32] = st[0]
                                tid: T.let[T.int32] = ty * 32 + tx
                                g: T.let[T.int32] = tx // 4
                                c4: T.let[T.int32] = tx % 4
                                sc: T.let[T.float32] = sm_scale * T.float32(scale_log2)
                                q_start: T.let[T.int32] = q_indptr[b]
                                q_n: T.let[T.int32] = q_indptr[b + 1] - q_start
                                kv_start: T.let[T.int32] = kv_indptr[b]
                                kv_n: T.let[T.int32] = kv_indptr[b + 1] - kv_start
                                row0: T.let[T.int32] = (st[2] - 1 - st[1]) * tq
                                # keys any row of the tile may see
                                st[3] = T.if_then_else(
                                    causal > 0, T.min(kv_n, T.max(kv_n - q_n + (row0 + tq - 1) // group + 1, 0)), kv_n)
                                stage_q(Q_smem, q, q_start, q_n, row0, by, tid)
                                for h in T.unroll(2):
                                    sm[h] = T.float32(-5e4)
                                    sm[2 + h] = T.float32(0)
                                for j in T.unroll(nd8 * 4):
                                    oacc[j] = T.float32(0)
                                # the rows' key limits (exclusive, from the sequence's first key)
                                pos0: T.let[T.int32] = (row0 + ty * 16 + g) // group
                                pos1: T.let[T.int32] = (row0 + ty * 16 + g + 8) // group
                                lim0: T.let[T.int32] = T.if_then_else(causal > 0, T.min(kv_n - q_n + pos0 + 1, kv_n), kv_n)
                                lim1: T.let[T.int32] = T.if_then_else(causal > 0, T.min(kv_n - q_n + pos1 + 1, kv_n), kv_n)
                                T.tvm_storage_sync("shared")
                                # element-wise stores: a vectorized store would make TVM declare the
                                # fragment array as half2, and the mma operand offsets (in halves) wrong
                                for kk in T.unroll(nd16):
                                    for hh in T.unroll(2):  # columns +0 / +8 of the 16-wide step
                                        for h in T.unroll(2):  # rows g / g + 8
                                            for e in T.unroll(2):
                                                qf[kk * 8 + hh * 4 + h * 2 + e] = Q_smem[
                                                    (ty * 16 + g + 8 * h) * dp + kk * 16 + hh * 8 + c4 * 2 + e]
                                if prefetch:
                                    load_kv(kv_reg, k, v, kv_start, kv_n, by, tid, 0)
                                if stages == 2:  # tile 0 into buffer 0, tile 1's loads in flight
                                    store_kv(kv_reg, K_smem, Vt_smem, tid, 0)
                                    T.tvm_storage_sync("shared")
                                    load_kv(kv_reg, k, v, kv_start, kv_n, by, tid, 1)
                                for it in T.serial(T.ceildiv(st[3], tk)):
                                    if stages == 1:
                                        T.tvm_storage_sync("shared")
                                        if not prefetch:
                                            load_kv(kv_reg, k, v, kv_start, kv_n, by, tid, it)
                                        store_kv(kv_reg, K_smem, Vt_smem, tid, 0)
                                        T.tvm_storage_sync("shared")
                                        if prefetch:  # the next tile's loads fly while this one is computed
                                            load_kv(kv_reg, k, v, kv_start, kv_n, by, tid, it + 1)
                                    ko: T.let[T.int32] = T.if_then_else(stages == 2, it % 2, 0) * (tk * dp)
                                    vo: T.let[T.int32] = T.if_then_else(stages == 2, it % 2, 0) * (d * tkp)
                                    # S = Q Kᵀ: n-tile j holds keys 8j .. 8j + 7 of the step
                                    for j in T.unroll(nk8):
                                        for e in T.unroll(4):
                                            sacc[j * 4 + e] = T.float32(0)
                                        for kk in T.unroll(nd16):
                                            for hh in T.unroll(2):
                                                for e in T.unroll(2):
                                                    kb[hh * 2 + e] = K_smem[ko + (j * 8 + g) * dp + kk * 16 + hh * 8 + c4 * 2 + e]
                                            mma(qf, kk * 8, kb, sacc, j * 4)
                                    # online softmax in base 2 of rows g (h=0) and g+8 (h=1)
                                    for h in T.unroll(2):
                                        sm[4 + h] = sm[h]
                                        for j in T.unroll(nk8):
                                            for e in T.unroll(2):
                                                if it * tk + j * 8 + c4 * 2 + e < T.if_then_else(h == 0, lim0, lim1):
                                                    sm[4 + h] = T.max(sm[4 + h], sacc[j * 4 + h * 2 + e] * sc)
                                        for lm in T.unroll(2):  # over the four lanes of the row
                                            sm[4 + h] = combine(sm[4 + h], lm + 1, True)
                                        sm[6 + h] = T.exp2(sm[h] - sm[4 + h])
                                        sm[8 + h] = T.float32(0)
                                        for j in T.unroll(nk8):
                                            for e in T.unroll(2):
                                                p: T.let[T.float32] = T.if_then_else(
                                                    it * tk + j * 8 + c4 * 2 + e < T.if_then_else(h == 0, lim0, lim1),
                                                    T.exp2(sacc[j * 4 + h * 2 + e] * sc - sm[4 + h]), T.float32(0))
                                                sm[8 + h] = sm[8 + h] + p
                                                # accumulator tiles 2k, 2k+1 = the A fragment of key step k
                                                pf[j // 2 * 8 + j % 2 * 4 + h * 2 + e] = T.cast(p, dtype)
                                        sm[2 + h] = sm[2 + h] * sm[6 + h] + sm[8 + h]  # lane-partial sum
                                        sm[h] = sm[4 + h]
                                        for j in T.unroll(nd8):
                                            for e in T.unroll(2):
                                                oacc[j * 4 + h * 2 + e] = oacc[j * 4 + h * 2 + e] * sm[6 + h]
                                    # O += P V: n-tile j holds output columns 8j .. 8j + 7
                                    for kk in T.unroll(nk16):
                                        for j in T.unroll(nd8):
                                            for hh in T.unroll(2):
                                                for e in T.unroll(2):
                                                    vb[hh * 2 + e] = Vt_smem[vo + (j * 8 + g) * tkp + kk * 16 + hh * 8 + c4 * 2 + e]
                                            mma(pf, kk * 8, vb, oacc, j * 4)
                                    if stages == 2:  # tile it + 1 into the other buffer, one barrier per step
                                        store_kv(kv_reg, K_smem, Vt_smem, tid, (it + 1) % 2)
                                        T.tvm_storage_sync("shared")
                                        load_kv(kv_reg, k, v, kv_start, kv_n, by, tid, it + 2)
                                for h in T.unroll(2):
                                    for lm in T.unroll(2):
                                        sm[2 + h] = combine(sm[2 + h], lm + 1, False)
                                    r_out: T.let[T.int32] = row0 + ty * 16 + g + 8 * h
                                    pos_out: T.let[T.int32] = r_out // group
                                    if pos_out < q_n:
                                        for j in T.unroll(nd8):
                                            for e in T.unroll(2):
                                                output[q_start + pos_out, by * group + r_out % group, j * 8 + c4 * 2 + e] = T.cast(
                                                    oacc[j * 4 + h * 2 + e] / sm[2 + h], dtype)
                                        if c4 == 0:
                                            lse[q_start + pos_out, by * group + r_out % group] = sm[h] + T.log2(sm[2 + h])

    return batch_prefill_ragged_kv
