"""A tensor-core ``batch_prefill_ragged_kv``: TVM's ragged prefill attention with wmma inner products.

TVM's KV cache computes the self-attention of a prefill chunk with ``batch_prefill_ragged_kv``,
a SIMT flash-style kernel (:mod:`tuning.attention` searches its template constants). This module
writes the same kernel — same signature, same ragged batch through ``q_indptr``/``kv_indptr``,
same causal mask, same ``output`` and base-2 ``lse`` (``m + log2(d)`` of the scores scaled by
``sm_scale * log2(e)``, which the KV cache merges with later chunks' states) — with the two inner
products on tensor cores (wmma 16x16x16, fp16 in, fp32 accumulate):

* one block per (query tile, KV head); a query tile is ``16 * num_warps`` rows of the
  (position, head-in-group) row space TVM's kernel uses, and each row group of 16 has
  ``kv_warps`` warps (``kv_warps > 1``: each takes its own ``tile_k`` keys of every key step and
  keeps its own softmax state; the states are merged in base 2 at the end — more warps in flight
  for the same rows);
* per key step of ``kv_warps * tile_k`` keys: K and V go to shared memory (16-byte loads by all
  threads; with ``prefetch`` the next step's loads are issued into registers before this step's
  math); each warp computes its 16 x tile_k block of S = Q Kᵀ from Q fragments held in
  registers, stores it to shared memory as fp32, updates its rows' online-softmax state (SIMT:
  two lanes per row, combined through a warp shuffle; the state stays in registers), writes P as
  fp16, computes P V into fresh accumulators and folds them into the output rows it holds in
  registers with the row's rescale factor;
* with ``causal``, key steps entirely above the diagonal are skipped (TVM's kernel visits them and
  adds exact zeros), and the blocks of the longest (last) query tiles of each sequence start first.

Measured on an H200 (2026-12-01, GPT-2 small: 12 heads of 64, one causal sequence,
``bench/results/2026-12-01-h200-attn-tc``): 6.0 / 20.8 / 52.4 µs at 128 / 512 / 1024 tokens for
``warps=1x4 tile=16x64 prefetch`` (best geometric mean; 48.3 µs at 1024 for ``2x2 32x64
prefetch``), against 33.7 / 122.8 / 450.3 µs for TVM's SIMT kernel with its searched constants
and 17.2 / 23.9 / 25.5 µs for torch SDPA (flash), all timed back to back.

Rotary embedding inside the kernel (``rotary_mode == 1``) is not implemented: GPT-2 has learned
positions and its KV cache passes 0. A call with another value fails the kernel's host-side
assertion rather than computing attention without it. Only fp16 Q/K/V are supported
(tensor-core operands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .attention_tiles import pick_tile_macro, stage_q_macro

__all__ = ["TCConfig", "TCError", "is_tc_legal", "make_tc_ragged_prefill", "mma_candidates",
           "tc_candidates", "tc_shared_bytes", "template_of", "wmma_candidates"]

_LOG2E = math.log2(math.e)


class TCError(ValueError):
    """A configuration or key the tensor-core kernel does not support."""


@dataclass(frozen=True)
class TCConfig:
    """The template constants of the tensor-core prefill kernel."""

    num_warps: int  # query rows per block = 16 * num_warps
    tile_k: int  # keys per inner step
    row_lanes: int = 2  # lanes sharing a query row's softmax (1: both lanes of a row scan all of it)
    prefetch: bool = False  # load the next K/V tile into registers while computing this one
    kv_warps: int = 1  # warps splitting each key step (of kv_warps * tile_k keys) per row group; merged at the end
    mma: bool = False  # mma.sync m16n8k16 with S, P and O in registers (tuning.attention_mma); row_lanes unused
    stages: int = 1  # mma only: 2 = K/V double-buffered in shared memory, one barrier per key step

    def label(self) -> str:
        if self.mma:
            return (f"tc mma warps={self.num_warps} tile={16 * self.num_warps}x{self.tile_k}"
                    f"{' prefetch' if self.prefetch else ''}{' 2-stage' if self.stages == 2 else ''}")
        return (f"tc warps={self.num_warps}x{self.kv_warps} tile={16 * self.num_warps}x{self.kv_warps * self.tile_k}"
                f" lanes={self.row_lanes}{' prefetch' if self.prefetch else ''}")


def tc_shared_bytes(cfg: TCConfig, d: int) -> int:
    """Static shared memory of one block (bytes): Q/P, K, V tiles (fp16, padded rows) and S (fp32);
    with ``mma``: Q, K and Vᵀ tiles only (fp16, padded rows)."""
    if cfg.mma:
        return 2 * (16 * cfg.num_warps * (d + 8) + cfg.stages * (cfg.tile_k * (d + 8) + d * (cfg.tile_k + 8)))
    nw, tk = cfg.num_warps * cfg.kv_warps, cfg.tile_k
    half = 2 * (16 * nw * (max(d, tk) + 8) + 2 * cfg.kv_warps * tk * (d + 8))
    return half + 4 * 16 * nw * (max(tk, d) + 4 + 2 * (cfg.kv_warps > 1))


def is_tc_legal(cfg: TCConfig, key, target=None) -> bool:
    """Whether the kernel can be built for ``key`` with ``cfg``: fp16, head dims of 16s, static shared
    memory within the target's per-block limit (48 KiB without a target)."""
    limit = 48 * 1024
    if target is not None and "max_shared_memory_per_block" in target.attrs:
        limit = int(target.attrs["max_shared_memory_per_block"])
    common = (str(key.dtype) == "float16" and key.d % 16 == 0 and key.h_q % key.h_kv == 0
              and cfg.num_warps in (1, 2, 4, 8) and cfg.tile_k in (16, 32, 64, 128)
              and (not cfg.prefetch or cfg.tile_k * key.d <= 64 * 32 * cfg.num_warps)  # ≤ 64 registers of K/V
              and tc_shared_bytes(cfg, key.d) <= limit)
    if cfg.mma:
        return common and cfg.kv_warps == 1 and cfg.stages in (1, 2) and (cfg.stages == 1 or cfg.prefetch)
    return (common and cfg.stages == 1 and cfg.row_lanes in (1, 2) and cfg.kv_warps in (1, 2, 4)
            and cfg.num_warps * cfg.kv_warps <= 8)


def tc_candidates(key, target=None) -> list[TCConfig]:
    """The legal configurations of the tensor-core template's search grid: wmma, then mma.sync."""
    return wmma_candidates(key, target) + mma_candidates(key, target)


def wmma_candidates(key, target=None) -> list[TCConfig]:
    """The legal configurations of the wmma kernel (``mma=False``)."""
    # row_lanes=1 is kept as a knob but not searched: slower at every size on an H200 (2026-12-01)
    return [c for w in (1, 2, 4, 8) for kw in (1, 2, 4) for tk in (16, 32, 64, 128) for pf in (False, True)
            if is_tc_legal(c := TCConfig(num_warps=w, tile_k=tk, prefetch=pf, kv_warps=kw), key, target)]


def mma_candidates(key, target=None) -> list[TCConfig]:
    """The legal configurations of the register-resident mma.sync variant (``mma=True``)."""
    return [c for w in (1, 2, 4, 8) for tk in (32, 64, 128) for pf, st in ((False, 1), (True, 1), (True, 2))
            if is_tc_legal(c := TCConfig(num_warps=w, tile_k=tk, prefetch=pf, mma=True, stages=st), key, target)]


def template_of(cfg) -> str:
    """``"simt"`` for TVM's template's configuration, ``"tc"`` for a tensor-core one."""
    return "tc" if isinstance(cfg, TCConfig) else "simt"


def make_tc_ragged_prefill(cfg: TCConfig, key, target=None):  # pylint: disable=too-many-locals,too-many-statements
    """The tensor-core ``batch_prefill_ragged_kv`` PrimFunc for ``key`` (an ``AttentionKey``).

    Raises
    ------
    TCError
        ``cfg`` or ``key`` is not supported (see :func:`is_tc_legal`).
    """
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    if not is_tc_legal(cfg, key, target):
        raise TCError(f"tensor-core attention {cfg.label()} is not supported for {key.label()}")
    if cfg.mma:
        from .attention_mma import make_mma_ragged_prefill  # pylint: disable=import-outside-toplevel

        return make_mma_ragged_prefill(cfg, key)
    h_kv, h_q, d, dtype = key.h_kv, key.h_q, key.d, key.dtype
    group = h_q // h_kv
    ks, tk = cfg.kv_warps, cfg.tile_k
    nw = cfg.num_warps * ks  # warp ty: row group ty // ks, key part ty % ks
    tq = 16 * cfg.num_warps
    tkb = ks * tk  # keys per step of the block
    nthr = 32 * nw
    dp = d + 8  # padded fp16 row stride (bank-conflict-free fragment loads)
    qpw = max(d, tk) + 8  # row stride of the Q / P buffer
    sw = max(tk, d) + 4  # fp32 row stride of S (also receives P V)
    nd, nk = d // 16, tk // 16  # 16-wide fragments along d and along the key tile
    vec = 8  # fp16 elements per 16-byte load
    kv_chunks = tkb * d // vec
    pick_tile = pick_tile_macro(group, tq)
    stage_q = stage_q_macro(group=group, tq=tq, d=d, nthr=nthr, stride=qpw, dtype=dtype)
    half_d = d // 2
    scale_log2 = _LOG2E

    rl = cfg.row_lanes

    def col_of(jj, tx, width):  # column a lane handles at step jj of a row of ``width`` (rl=2: rotated by
        # 2 for rows 8-15 of the warp, so that lane pairs of rows r and r+8 fall in different banks)
        if rl == 1:
            return jj
        return (jj * 2 + tx // 16 + (tx % 16) // 8 * 2) % width

    def out_col(j, tx):  # the output column of a lane's register j (same bank rotation as col_of)
        return (j * 2 + tx // 16 + (tx % 16) // 8 * 2) % d

    def combine(x, is_max):  # the two lanes of a row: max or sum of their shares
        if rl == 1:
            return x
        other = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), x, 16, 32, 32)
        return T.max(x, other) if is_max else x + other

    def ptr(buf, offset, extent, rw):
        return T.tvm_access_ptr(T.type_annotation(buf.dtype), buf.data, offset, extent, rw)

    n_ld = -(-kv_chunks // nthr)  # 16-byte loads per thread per K (and per V) tile
    prefetch = cfg.prefetch

    # pylint: disable=invalid-name,unused-variable
    @T.macro
    def load_kv(kv_reg: T.Buffer, k: T.Buffer, v: T.Buffer, kv_start: T.int32, kv_n: T.int32, by: T.int32,
                ty: T.int32, tx: T.int32, it: T.int32):
        for c in T.unroll(n_ld):
            if c * nthr + ty * 32 + tx < kv_chunks:
                r: T.let[T.int32] = (c * nthr + ty * 32 + tx) // (d // vec)
                col: T.let[T.int32] = (c * nthr + ty * 32 + tx) % (d // vec) * vec
                if it * tkb + r < kv_n:
                    kv_reg[T.ramp(c * vec, 1, vec)] = k[kv_start + it * tkb + r, by, T.ramp(col, 1, vec)]
                    kv_reg[T.ramp((n_ld + c) * vec, 1, vec)] = v[kv_start + it * tkb + r, by, T.ramp(col, 1, vec)]
                else:
                    kv_reg[T.ramp(c * vec, 1, vec)] = T.broadcast(T.cast(0, dtype), vec)
                    kv_reg[T.ramp((n_ld + c) * vec, 1, vec)] = T.broadcast(T.cast(0, dtype), vec)

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
                            # Q is staged once (its fragments stay in registers); P reuses the buffer
                            QP_smem = T.sblock_alloc_buffer((nw * 16 * qpw,), dtype, scope="shared")
                            K_smem = T.sblock_alloc_buffer((tkb, dp), dtype, scope="shared")
                            V_smem = T.sblock_alloc_buffer((tkb, dp), dtype, scope="shared")
                            S_smem = T.sblock_alloc_buffer((nw * 16, sw), "float32", scope="shared")
                            md_smem = T.sblock_alloc_buffer((nw * 16 * 2 if ks > 1 else 1,), "float32", scope="shared")
                            Q_frag = T.sblock_alloc_buffer((nd * 16, 16), dtype, scope="wmma.matrix_a")
                            P_frag = T.sblock_alloc_buffer((16, 16), dtype, scope="wmma.matrix_a")
                            K_frag = T.sblock_alloc_buffer((16, 16), dtype, scope="wmma.matrix_b")
                            V_frag = T.sblock_alloc_buffer((16, 16), dtype, scope="wmma.matrix_b")
                            S_frag = T.sblock_alloc_buffer((nk * 16, 16), "float32", scope="wmma.accumulator")
                            O_frag = T.sblock_alloc_buffer((nd * 16, 16), "float32", scope="wmma.accumulator")
                            O_loc = T.sblock_alloc_buffer((half_d,), "float32", scope="local")
                            kv_reg = T.sblock_alloc_buffer((2 * n_ld * vec,), dtype, scope="local")
                            st = T.sblock_alloc_buffer((6,), "int32", scope="local")  # b, tile, tiles, n_kv
                            ms = T.sblock_alloc_buffer((5,), "float32", scope="local")  # m, d, m_new, alpha, sum

                            pick_tile(st, q_indptr, batch_size, bx)
                            if T.tvm_thread_invariant(st[0] < batch_size):
                                b: T.let[T.int32] = st[0]
                                sc: T.let[T.float32] = sm_scale * T.float32(scale_log2)
                                q_start: T.let[T.int32] = q_indptr[b]
                                q_n: T.let[T.int32] = q_indptr[b + 1] - q_start
                                kv_start: T.let[T.int32] = kv_indptr[b]
                                kv_n: T.let[T.int32] = kv_indptr[b + 1] - kv_start
                                row0: T.let[T.int32] = (st[2] - 1 - st[1]) * tq
                                # keys any row of the tile may see
                                st[3] = T.if_then_else(
                                    causal > 0, T.min(kv_n, T.max(kv_n - q_n + (row0 + tq - 1) // group + 1, 0)), kv_n)
                                stage_q(QP_smem, q, q_start, q_n, row0, by, ty * 32 + tx)
                                ms[0] = T.float32(-5e4)
                                ms[1] = T.float32(0)
                                for j in T.unroll(half_d):
                                    O_loc[j] = T.float32(0)
                                T.tvm_storage_sync("shared")
                                for j in T.unroll(nd):
                                    T.evaluate(T.tvm_load_matrix_sync(
                                        Q_frag.data, 16, 16, 16, j, ptr(QP_smem, ty // ks * 16 * qpw + j * 16, 16 * qpw, 1),
                                        qpw, "row_major", dtype="void"))
                                if prefetch:
                                    load_kv(kv_reg, k, v, kv_start, kv_n, by, ty, tx, 0)
                                for it in T.serial(T.ceildiv(st[3], tkb)):
                                    T.tvm_storage_sync("shared")
                                    if not prefetch:
                                        load_kv(kv_reg, k, v, kv_start, kv_n, by, ty, tx, it)
                                    for c in T.unroll(n_ld):
                                        if c * nthr + ty * 32 + tx < kv_chunks:
                                            K_smem[(c * nthr + ty * 32 + tx) // (d // vec),
                                                   T.ramp((c * nthr + ty * 32 + tx) % (d // vec) * vec, 1, vec)] = \
                                                kv_reg[T.ramp(c * vec, 1, vec)]
                                            V_smem[(c * nthr + ty * 32 + tx) // (d // vec),
                                                   T.ramp((c * nthr + ty * 32 + tx) % (d // vec) * vec, 1, vec)] = \
                                                kv_reg[T.ramp((n_ld + c) * vec, 1, vec)]
                                    T.tvm_storage_sync("shared")
                                    if prefetch:  # the next tile's loads fly while this one is computed
                                        load_kv(kv_reg, k, v, kv_start, kv_n, by, ty, tx, it + 1)
                                    # S = Q K^T for this warp's 16 rows
                                    for j in T.unroll(nk):
                                        T.evaluate(T.tvm_fill_fragment(S_frag.data, 16, 16, 16, j, T.float32(0), dtype="void"))
                                        for kk in T.unroll(nd):
                                            T.evaluate(T.tvm_load_matrix_sync(
                                                K_frag.data, 16, 16, 16, 0,
                                                ptr(K_smem, (ty % ks * tk + j * 16) * dp + kk * 16, 16 * dp, 1),
                                                dp, "col_major", dtype="void"))
                                            T.evaluate(T.tvm_mma_sync(S_frag.data, j, Q_frag.data, kk, K_frag.data, 0,
                                                                      S_frag.data, j, dtype="void"))
                                        T.evaluate(T.tvm_store_matrix_sync(
                                            S_frag.data, 16, 16, 16, j, ptr(S_smem, ty * 16 * sw + j * 16, 16 * sw, 2),
                                            sw, "row_major", dtype="void"))
                                    T.tvm_storage_sync("shared")
                                    # online softmax of this warp's rows: lanes tx and tx+16 own row ty*16 + tx%16;
                                    # with row_lanes=2 they split its columns and combine through a shuffle, with 1
                                    # both scan all of it (same state either way: equal stores are benign)
                                    row: T.let[T.int32] = ty * 16 + tx % 16  # of S / P (the warp's own rows)
                                    lim: T.let[T.int32] = T.if_then_else(
                                        causal > 0, T.min(kv_n - q_n + (row0 + ty // ks * 16 + tx % 16) // group + 1, kv_n),
                                        kv_n) - it * tkb - ty % ks * tk
                                    ms[2] = ms[0]
                                    for jj in T.unroll(tk // rl):
                                        if col_of(jj, tx, tk) < lim:
                                            ms[2] = T.max(ms[2], S_smem[row, col_of(jj, tx, tk)] * sc)
                                    ms[2] = combine(ms[2], True)
                                    ms[3] = T.exp2(ms[0] - ms[2])
                                    ms[4] = T.float32(0)
                                    for jj in T.unroll(tk // rl):
                                        p: T.let[T.float32] = T.if_then_else(
                                            col_of(jj, tx, tk) < lim,
                                            T.exp2(S_smem[row, col_of(jj, tx, tk)] * sc - ms[2]),
                                            T.float32(0))
                                        ms[4] = ms[4] + p
                                        QP_smem[row * qpw + col_of(jj, tx, tk)] = T.cast(p, dtype)
                                    ms[1] = ms[1] * ms[3] + combine(ms[4], False)
                                    ms[0] = ms[2]
                                    T.tvm_storage_sync("shared")
                                    # O_tile = P V into fresh accumulators, staged through S_smem
                                    for j in T.unroll(nd):
                                        T.evaluate(T.tvm_fill_fragment(O_frag.data, 16, 16, 16, j, T.float32(0), dtype="void"))
                                    for kk in T.unroll(nk):
                                        T.evaluate(T.tvm_load_matrix_sync(
                                            P_frag.data, 16, 16, 16, 0, ptr(QP_smem, ty * 16 * qpw + kk * 16, 16 * qpw, 1),
                                            qpw, "row_major", dtype="void"))
                                        for j in T.unroll(nd):
                                            T.evaluate(T.tvm_load_matrix_sync(
                                                V_frag.data, 16, 16, 16, 0,
                                                ptr(V_smem, (ty % ks * tk + kk * 16) * dp + j * 16, 16 * dp, 1),
                                                dp, "row_major", dtype="void"))
                                            T.evaluate(T.tvm_mma_sync(O_frag.data, j, P_frag.data, 0, V_frag.data, 0,
                                                                      O_frag.data, j, dtype="void"))
                                    for j in T.unroll(nd):
                                        T.evaluate(T.tvm_store_matrix_sync(
                                            O_frag.data, 16, 16, 16, j, ptr(S_smem, ty * 16 * sw + j * 16, 16 * sw, 2),
                                            sw, "row_major", dtype="void"))
                                    T.tvm_storage_sync("shared")
                                    # fold into the register rows: lane owns row tx%16 (the row whose softmax
                                    # state it holds) and half of its columns (out_col)
                                    for j in T.unroll(half_d):
                                        O_loc[j] = O_loc[j] * ms[3] + S_smem[ty * 16 + tx % 16, out_col(j, tx)]
                                r_out: T.let[T.int32] = row0 + ty // ks * 16 + tx % 16
                                pos_out: T.let[T.int32] = r_out // group
                                if ks > 1:  # merge the key parts' states (in base 2) into the part-0 warp
                                    for j in T.unroll(half_d):
                                        S_smem[ty * 16 + tx % 16, out_col(j, tx)] = O_loc[j]
                                    md_smem[(ty * 16 + tx % 16) * 2] = ms[0]
                                    md_smem[(ty * 16 + tx % 16) * 2 + 1] = ms[1]
                                    T.tvm_storage_sync("shared")
                                    if ty % ks == 0:
                                        for w in T.unroll(1, ks):
                                            ms[2] = T.max(ms[0], md_smem[((ty + w) * 16 + tx % 16) * 2])
                                            ms[3] = T.exp2(ms[0] - ms[2])
                                            ms[4] = T.exp2(md_smem[((ty + w) * 16 + tx % 16) * 2] - ms[2])
                                            ms[1] = ms[1] * ms[3] + md_smem[((ty + w) * 16 + tx % 16) * 2 + 1] * ms[4]
                                            for j in T.unroll(half_d):
                                                O_loc[j] = O_loc[j] * ms[3] + S_smem[(ty + w) * 16 + tx % 16, out_col(j, tx)] * ms[4]
                                            ms[0] = ms[2]
                                if ty % ks == 0:
                                    for j in T.unroll(half_d):
                                        if pos_out < q_n:
                                            output[q_start + pos_out, by * group + r_out % group, out_col(j, tx)] = T.cast(
                                                O_loc[j] / ms[1], dtype)
                                    if pos_out < q_n:
                                        if tx < 16:
                                            lse[q_start + pos_out, by * group + r_out % group] = ms[0] + T.log2(ms[1])

    return batch_prefill_ragged_kv

