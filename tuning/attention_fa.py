"""A Hopper (sm_90a) flash-attention ``batch_prefill_ragged_kv``: TMA, mbarrier ring, ``wgmma`` (template ``"fa"``).

The third template of the prefill attention search (:mod:`tuning.attention`), next to TVM's SIMT
kernel and the mma.sync kernel of :mod:`tuning.attention_tc`: the same signature, the same ragged
batch (``q_indptr`` / ``kv_indptr``), the same causal mask (query ``i`` of a sequence sits at
position ``kv_len - q_len + i`` and sees the keys up to it), the same ``output`` and base-2 ``lse``
(``m + log2(d)`` of the scores scaled by ``sm_scale * log2(e)``). ``rotary_mode`` must be 0 (host
assertion), Q/K/V fp16, as many KV heads as query heads, head dim 64.

FA3-lite, written as a TIRx PrimFunc (``tir_pipeline="tirx"``, like :mod:`gpt2_model.wgmma_gemm`;
built for sm_90a through :mod:`gpt2_model.wgmma_build`). One CTA per (sequence, query tile, head);
the blocks of a sequence's last (longest, causal) tiles start first:

* host part: three ``cuTensorMapEncodeTiled`` descriptors over the ragged ``[tokens, heads, 64]``
  Q, K, V tensors (3-D: 64 dims x 1 head x ``rows`` tokens per box, 128-byte swizzle);
* shared memory (dynamic, 1024-aligned): the Q tile (``tile_q`` x 128 B) and a ring of ``stages``
  K and V tiles (``tile_k`` x 128 B each); mbarriers ``qbar``, ``full[stages]``, ``empty[stages]``;
* producer: one thread (a producer warpgroup with ``producer=True``, else thread 0 between its
  own MMAs) issues the TMA loads of K and V tile ``t`` into slot ``t % stages`` after the slot's
  ``empty`` barrier (one arrival per consumer warp) and arms ``full`` with the byte count;
* consumers: ``tile_q / 64`` warpgroups of 64 query rows each. Per key tile: S = Q Kᵀ with
  ``wgmma.m64n{tile_k}k16`` (both operands K-major descriptors: SW128, SBO 1024 B, +32 B per
  k16 step); the online softmax on the fp32 accumulators in registers (thread ``t`` of warp ``w``
  holds rows ``16w + t/4`` and ``+8``, columns ``8j + 2(t%4) + {0,1}``; row max and sum over the
  quad by shuffles, base 2, ``ex2.approx``); keys past the row's causal limit or past the
  sequence's end are set to -2^126 before the max (TMA zero-fills only past the tensor's end, and
  a tile may run into the next sequence of a ragged batch); P is packed to f16x2 in the
  accumulator -> A-fragment order and O += P V is a register-A ``wgmma`` with V as an MN-major
  (transposed, ``imm-trans-b = 1``) SW128 descriptor (SBO 1024 B = 8 keys, +2048 B per k16 step);
  a warpgroup skips the wgmmas of key tiles wholly above its diagonal (still releasing the slot);
* epilogue: O / d through ``cvt.rn.f16x2.f32`` into 4-byte stores, ``lse = m + log2(d)``.

Not run on a card yet (written 2026-12-07 on a CPU machine): ``scripts/attn_fa_check.py`` and
the GPU-marked tests of ``tests/tuning/test_attention_fa.py`` check every candidate against NumPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpt2_model.wgmma_gemm import KERNEL_ATTR

__all__ = ["FAConfig", "FAError", "FA_CANDIDATES", "fa_candidates", "fa_problem", "fa_smem_bytes",
           "is_fa_target", "make_fa_ragged_prefill"]

_LOG2E = math.log2(math.e)
_TMA_LOAD_3D = "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
_CVT_F16X2 = "cvt.rn.f16x2.f32"
_MASKED = -(2.0 ** 126)  # a masked score (finite: no inf - inf); the running max starts at -2^100
_M_INIT = -(2.0 ** 100)
#: The attribute (value: the config label) that routes a kernel through the tirx lowering of
#: :func:`gpt2_model.wgmma_build.register_mixed_pipeline` (and the sm_90a compile hook) in a model build.
FA_KERNEL_ATTR = KERNEL_ATTR

# Device helpers, one source string each (TVM emits one definition per function name). Operand
# fences keep nvcc from moving reads/writes of a register across the asynchronous wgmma that owns
# it (CUTLASS's warpgroup_fence_operand); the quad reductions combine the 4 lanes holding one row.
_SRC = {
    "fa_fence_f32": 'asm volatile("" : "+f"(r) :: "memory");',
    "fa_fence_u32": 'asm volatile("" : "+r"(r) :: "memory");',
    "fa_exp2": 'float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;',
    "fa_quad_max": "x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1)); return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));",
    "fa_quad_sum": "x += __shfl_xor_sync(0xffffffffu, x, 1); return x + __shfl_xor_sync(0xffffffffu, x, 2);",
}
_SIG = {"fa_fence_f32": "void fa_fence_f32(float& r)", "fa_fence_u32": "void fa_fence_u32(unsigned& r)",
        "fa_exp2": "float fa_exp2(float x)", "fa_quad_max": "float fa_quad_max(float x)",
        "fa_quad_sum": "float fa_quad_sum(float x)"}
_SRC = {name: f"\n__device__ __forceinline__ {_SIG[name]} {{ {body} }}\n" for name, body in _SRC.items()}


class FAError(ValueError):
    """A configuration, key or target the wgmma flash-attention kernel does not support."""


@dataclass(frozen=True)
class FAConfig:
    """The template constants of the wgmma prefill kernel.

    tile_q: query rows per CTA (64 or 128: one or two consumer warpgroups of 64 rows).
    tile_k: keys per pipeline stage (64 or 128: the N of the S wgmma, 4 or 8 k16 steps of P V).
    stages: K/V ring depth (2 or 3).
    producer: a producer warpgroup only issues TMA (``setmaxnreg`` 40/232 with two consumers);
        otherwise thread 0 issues the loads ``stages`` tiles ahead between its own MMAs.
    """

    tile_q: int = 128
    tile_k: int = 128
    stages: int = 2
    producer: bool = True

    def label(self) -> str:
        return f"fa wgmma tile={self.tile_q}x{self.tile_k} stages={self.stages}{' producer' if self.producer else ''}"

    @property
    def consumers(self) -> int:
        return self.tile_q // 64

    def threads(self) -> int:
        return 128 * (self.consumers + int(self.producer))


#: The searched configurations (tile_q, tile_k, stages, producer).
FA_CANDIDATES = tuple(FAConfig(*c) for c in (
    (128, 128, 2, True), (128, 128, 2, False), (128, 64, 3, True), (128, 64, 2, False),
    (128, 128, 3, True), (64, 128, 2, True), (64, 64, 3, True), (64, 64, 2, False), (64, 128, 2, False)))


def fa_smem_bytes(cfg: FAConfig, d: int = 64) -> int:
    """Dynamic shared memory of one CTA (bytes): the Q tile and ``stages`` K and V tiles."""
    return 2 * d * (cfg.tile_q + 2 * cfg.stages * cfg.tile_k)


def is_fa_target(target) -> bool:
    """Whether ``target`` is a CUDA sm_90 / sm_90a target (wgmma, TMA)."""
    if target is None or str(target.kind.name) != "cuda":
        return False
    return str(target.attrs.get("arch", "")).startswith("sm_90")


def fa_problem(cfg: FAConfig, key, target=None) -> str | None:
    """Why ``cfg`` cannot make ``key``'s kernel for ``target`` (None: it can)."""
    if str(key.dtype) != "float16":
        return f"dtype {key.dtype} (fp16 Q/K/V only)"
    if key.h_q != key.h_kv:
        return f"h_q={key.h_q} != h_kv={key.h_kv} (grouped heads are not implemented)"
    if key.d != 64:
        return f"head dim {key.d} (64 only: one 128-byte swizzled row per token)"
    if cfg.tile_q not in (64, 128) or cfg.tile_k not in (64, 128) or cfg.stages not in (2, 3):
        return f"{cfg.label()}: tile_q and tile_k must be 64 or 128, stages 2 or 3"
    if fa_smem_bytes(cfg, key.d) > 227 * 1024:
        return f"{cfg.label()}: {fa_smem_bytes(cfg, key.d)} B of shared memory"
    if target is not None and not is_fa_target(target):
        return f"target {target} is not CUDA sm_90 (wgmma and TMA need Hopper)"
    return None


def fa_candidates(key, target=None) -> list[FAConfig]:
    """The legal configurations of :data:`FA_CANDIDATES` for ``key`` on ``target`` (none off sm_90)."""
    return [c for c in FA_CANDIDATES if fa_problem(c, key, target) is None]


def make_fa_ragged_prefill(cfg: FAConfig, key, target=None):
    """The wgmma ``batch_prefill_ragged_kv`` (a TIRx PrimFunc) for ``key`` (an ``AttentionKey``).

    Raises
    ------
    FAError
        ``cfg``, ``key`` or ``target`` is not supported (see :func:`fa_problem`).
    """
    problem = fa_problem(cfg, key, target)
    if problem is not None:
        raise FAError(f"wgmma flash attention: {problem}")
    func = _make(cfg, key.h_q, key.d)
    return func.with_attrs({"tirx.is_scheduled": True, FA_KERNEL_ATTR: cfg.label()})


def _make(cfg: FAConfig, H: int, D: int):  # noqa: C901 - one kernel, straight-line  # pylint: disable=too-many-locals,too-many-statements
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    TQ, TK, S, NC, WS = cfg.tile_q, cfg.tile_k, cfg.stages, cfg.consumers, cfg.producer
    THREADS = cfg.threads()
    ROW_B = D * 2                       # bytes per token row of a tile (128: one swizzle row)
    K_BASE = TQ * D                     # element offset of the K ring in the arena
    V_BASE = K_BASE + S * TK * D        # element offset of the V ring
    KV_TX = 2 * TK * ROW_B              # bytes a K/V stage receives
    NS = TK // 2                        # S accumulators per thread
    NO = D // 2                         # O accumulators per thread
    NP = TK // 4                        # packed f16x2 P registers per thread
    REG_SPLIT = WS and NC == 2
    MMA_S = f"wgmma.mma_async.sync.aligned.m64n{TK}k16.f32.f16.f16"
    MMA_O = f"wgmma.mma_async.sync.aligned.m64n{D}k16.f32.f16.f16"
    f32 = "float32"

    def call(name, *args, ret="void"):
        return T.cuda.func_call(name, *args, source_code=_SRC[name], return_type=ret)

    def fence(buf, n, kind):
        for i in range(n):
            T.evaluate(call(f"fa_fence_{kind}", buf[i]))

    def produce(t, head, kv_start, K_map, V_map, arena, full, empty):
        """Wait for slot ``t % S`` to be free, then TMA-load K and V tile ``t`` into it."""
        slot = t % S
        T.evaluate(T.cuda.mbarrier_wait(empty.ptr_to([slot]), ((t // S) & 1) ^ 1))
        T.evaluate(T.ptx.mbarrier.arrive.expect_tx.shared.b64(full.ptr_to([slot]), T.uint32(KV_TX)))
        T.evaluate(T.ptx[_TMA_LOAD_3D](arena.ptr_to([K_BASE + slot * TK * D]), T.address_of(K_map),
                                       0, head, kv_start + t * TK, full.ptr_to([slot])))
        T.evaluate(T.ptx[_TMA_LOAD_3D](arena.ptr_to([V_BASE + slot * TK * D]), T.address_of(V_map),
                                       0, head, kv_start + t * TK, full.ptr_to([slot])))

    def scores(t, wg, sacc, desc):
        """S = Q Kᵀ of key tile ``t`` for warpgroup ``wg`` (scale_d false on the first k16 step)."""
        slot = t % S
        T.evaluate(T.ptx.wgmma.fence.sync.aligned())
        for kk in range(D // 16):
            da = desc[0] + T.Cast("uint64", (wg * 64 * ROW_B + kk * 32) // 16)
            db = desc[1] + T.Cast("uint64", (slot * TK * ROW_B + kk * 32) // 16)
            T.evaluate(T.ptx[MMA_S](*[sacc[i] for i in range(NS)], da, db, T.bool(kk > 0), 1, 1, 0, 0))
        T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))
        fence(sacc, NS, "f32")

    def softmax(t, sc, lim, sacc, oacc, pk, ms, lane):
        """Online softmax of the tile's scores (in place: S -> P), O rescaled, P packed to f16x2.
        ``ms``: [m_g, m_g8, d_g, d_g8, scratch max, scratch sum, alpha]."""
        for h in range(2):
            T.buffer_store(ms, ms[h], [4])
            for j in range(TK // 8):
                for e in range(2):
                    i = j * 4 + 2 * h + e
                    col = t * TK + j * 8 + (lane % 4) * 2 + e
                    T.buffer_store(sacc, T.if_then_else(col < lim[h], sacc[i] * sc, T.float32(_MASKED)), [i])
                    T.buffer_store(ms, T.max(ms[4], sacc[i]), [4])
            T.buffer_store(ms, call("fa_quad_max", ms[4], ret=f32), [4])
            T.buffer_store(ms, call("fa_exp2", ms[h] - ms[4], ret=f32), [6])
            T.buffer_store(ms, ms[4], [h])
            T.buffer_store(ms, T.float32(0), [5])
            for j in range(TK // 8):
                for e in range(2):
                    i = j * 4 + 2 * h + e
                    T.buffer_store(sacc, call("fa_exp2", sacc[i] - ms[4], ret=f32), [i])
                    T.buffer_store(ms, ms[5] + sacc[i], [5])
            T.buffer_store(ms, ms[2 + h] * ms[6] + ms[5], [2 + h])
            for j in range(D // 8):
                for e in range(2):
                    T.buffer_store(oacc, oacc[j * 4 + 2 * h + e] * ms[6], [j * 4 + 2 * h + e])
        # A fragment of k16 step kk: (row g, keys 2c..), (g+8, 2c..), (g, 8+2c..), (g+8, 8+2c..);
        # cvt.rn.f16x2.f32 d, a, b puts a in the upper half
        for kk in range(TK // 16):
            for r in range(4):
                src = (2 * kk + r // 2) * 4 + 2 * (r % 2)
                T.evaluate(T.ptx[_CVT_F16X2](pk[kk * 4 + r], sacc[src + 1], sacc[src]))

    def pv(t, oacc, pk, desc):
        """O += P V of key tile ``t`` (A = P from registers, B = V transposed from shared memory)."""
        slot = t % S
        fence(pk, NP, "u32")
        fence(oacc, NO, "f32")
        T.evaluate(T.ptx.wgmma.fence.sync.aligned())
        for kk in range(TK // 16):
            db = desc[2] + T.Cast("uint64", (slot * TK * ROW_B + kk * 16 * ROW_B) // 16)
            T.evaluate(T.ptx[MMA_O](*[oacc[i] for i in range(NO)], *[pk[kk * 4 + r] for r in range(4)], db,
                                    T.bool(True), 1, 1, 1))
        T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))
        fence(oacc, NO, "f32")
        fence(pk, NP, "u32")

    @T.inline
    def epilogue(oacc, ms, rowq, q_start, q_n, head, out32, lse, lane, packed):
        for h in T.unroll(2):
            ms[2 + h] = call("fa_quad_sum", ms[2 + h], ret=f32)
            ms[6] = T.float32(1) / ms[2 + h]
            if rowq + 8 * h < q_n:
                for j in T.unroll(D // 8):
                    T.ptx[_CVT_F16X2](packed[0], oacc[j * 4 + 2 * h + 1] * ms[6], oacc[j * 4 + 2 * h] * ms[6])
                    out32[q_start + rowq + 8 * h, head, j * 4 + lane % 4] = packed[0]
                if lane % 4 == 0:
                    lse[q_start + rowq + 8 * h, head] = ms[h] + T.log2(ms[2 + h])

    @T.inline
    def consume(wg, warp, lane, row0, n_kt, q_start, q_n, kv_start, kv_n, head, causal, sc, K_map, V_map, arena,
                qbar, full, empty, out32, lse):
        sacc = T.alloc_local((NS,), f32)
        oacc = T.alloc_local((NO,), f32)
        pk = T.alloc_local((NP,), "uint32")
        ms = T.alloc_local((7,), f32)
        lim = T.alloc_local((2,), "int32")
        desc = T.alloc_local((3,), "uint64")
        packed = T.alloc_local((1,), "uint32")
        rowq = row0 + wg * 64 + warp * 16 + lane // 4  # this thread's first row (of the sequence)
        for h in T.unroll(2):
            ms[h] = T.float32(_M_INIT)
            ms[2 + h] = T.float32(0)
            lim[h] = T.if_then_else(causal > 0, T.min(kv_n, kv_n - q_n + rowq + 8 * h + 1), kv_n)
        for i in T.unroll(NO):
            oacc[i] = T.float32(0)
        # keys this warpgroup's rows may see (its tiles past them are skipped, the slot still released)
        wg_hi = T.if_then_else(causal > 0, T.min(kv_n, T.max(kv_n - q_n + row0 + wg * 64 + 64, 0)), kv_n)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[0]), arena.ptr_to([0]), 1, 64, 3)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[1]), arena.ptr_to([K_BASE]), 1, 64, 3)
        # V as the MN-major B of P V: SBO = 1024 B between 8-key groups; LBO (between 64-wide column
        # blocks) is unused with 64 columns
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc[2]), arena.ptr_to([V_BASE]), TK * 8, 64, 3)
        T.cuda.mbarrier_wait(qbar.ptr_to([0]), 0)
        for t in range(n_kt):
            T.cuda.mbarrier_wait(full.ptr_to([t % S]), (t // S) & 1)
            if t * TK < wg_hi:
                scores(t, wg, sacc, desc)
                softmax(t, sc, lim, sacc, oacc, pk, ms, lane)
                pv(t, oacc, pk, desc)
            if lane == 0:
                T.ptx.mbarrier.arrive.shared.b64(empty.ptr_to([t % S]), T.uint32(1))
            if not WS:
                if wg * 128 + warp * 32 + lane == 0:
                    if t + S < n_kt:
                        produce(t + S, head, kv_start, K_map, V_map, arena, full, empty)
        epilogue(oacc, ms, rowq, q_start, q_n, head, out32, lse, lane, packed)

    @T.inline
    def kernel_body(Q_map, K_map, V_map, q_indptr, kv_indptr, batch_size, qo_len, causal, sm_scale, out32, lse):
        bx = T.cta_id([(T.ceildiv(qo_len, TQ) + batch_size) * H])
        tid = T.thread_id([THREADS])
        wg = tid // 128
        warp = (tid % 128) // 32
        lane = tid % 32
        head = bx % H
        arena = T.alloc_buffer((TQ * D + 2 * S * TK * D,), "float16", scope="shared.dyn", align=1024)
        qbar = T.alloc_shared((1,), "uint64")
        full = T.alloc_shared((S,), "uint64")
        empty = T.alloc_shared((S,), "uint64")
        st = T.alloc_local((3,), "int32")
        # which (sequence, query tile) this CTA computes: tiles counted from each sequence's last
        st[0] = 0
        st[1] = bx // H
        st[2] = T.ceildiv(q_indptr[1] - q_indptr[0], TQ)
        while st[0] < batch_size and st[1] >= st[2]:
            st[1] = st[1] - st[2]
            st[0] = st[0] + 1
            if st[0] < batch_size:
                st[2] = T.ceildiv(q_indptr[st[0] + 1] - q_indptr[st[0]], TQ)
        if st[0] < batch_size:
            q_start = q_indptr[st[0]]
            q_n = q_indptr[st[0] + 1] - q_start
            kv_start = kv_indptr[st[0]]
            kv_n = kv_indptr[st[0] + 1] - kv_start
            row0 = (st[2] - 1 - st[1]) * TQ
            sc = sm_scale * T.float32(_LOG2E)
            # key tiles any row of the CTA may see
            n_kt = T.ceildiv(T.if_then_else(causal > 0, T.min(kv_n, T.max(kv_n - q_n + row0 + TQ, 0)), kv_n), TK)
            if tid == 0:
                T.ptx.mbarrier.init.shared.b64(qbar.ptr_to([0]), T.uint32(1))
                for i in range(S):
                    T.ptx.mbarrier.init.shared.b64(full.ptr_to([i]), T.uint32(1))
                    T.ptx.mbarrier.init.shared.b64(empty.ptr_to([i]), T.uint32(4 * NC))
                T.ptx.fence.mbarrier_init.release.cluster()
            T.ptx.fence.proxy.async_.shared__cta()
            T.cuda.cta_sync()
            if tid == 0:
                T.ptx.mbarrier.arrive.expect_tx.shared.b64(qbar.ptr_to([0]), T.uint32(TQ * ROW_B))
                T.ptx[_TMA_LOAD_3D](arena.ptr_to([0]), T.address_of(Q_map), 0, head, q_start + row0,
                                    qbar.ptr_to([0]))
            if WS:
                if wg == NC:
                    if REG_SPLIT:
                        T.ptx["setmaxnreg.dec.sync.aligned.u32"](40)
                    if tid % 128 == 0:
                        for t in range(n_kt):
                            produce(t, head, kv_start, K_map, V_map, arena, full, empty)
                else:
                    if REG_SPLIT:
                        T.ptx["setmaxnreg.inc.sync.aligned.u32"](232)
                    consume(wg, warp, lane, row0, n_kt, q_start, q_n, kv_start, kv_n, head, causal, sc, K_map,
                            V_map, arena, qbar, full, empty, out32, lse)
            else:
                if tid == 0:
                    for t in range(T.min(S, n_kt)):
                        produce(t, head, kv_start, K_map, V_map, arena, full, empty)
                consume(wg, warp, lane, row0, n_kt, q_start, q_n, kv_start, kv_n, head, causal, sc, K_map, V_map,
                        arena, qbar, full, empty, out32, lse)

    @T.inline
    def encode(m, data, rows, box_rows):
        # 3-D map over [tokens, heads, D]: box D dims x 1 head x box_rows tokens, 128-byte swizzle
        T.call_packed("runtime.cuTensorMapEncodeTiled", m, "float16", 3, data, D, H, rows, ROW_B, H * ROW_B,
                      D, 1, box_rows, 1, 1, 1, 0, 3, 2, 0)

    @T.prim_func
    def batch_prefill_ragged_kv(  # pylint: disable=too-many-arguments
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
        q = T.match_buffer(var_q, (qo_len, H, D), "float16", align=16)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, H, D), "float16", align=16)
        v = T.match_buffer(var_v, (kv_len, H, D), "float16", align=16)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",
                                         elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",
                                           elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, H, D), "float16", align=16)
        lse = T.match_buffer(var_lse, (qo_len, H), "float32")
        out32 = T.decl_buffer((qo_len, H, D // 2), "uint32", data=output.data)
        assert rotary_mode == 0, "wgmma batch_prefill_ragged_kv: rotary_mode must be 0 (no RoPE in the kernel)"
        Q_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        K_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        V_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        encode(Q_map, q.data, qo_len, TQ)
        encode(K_map, k.data, kv_len, TK)
        encode(V_map, v.data, kv_len, TK)
        T.device_entry()
        kernel_body(Q_map, K_map, V_map, q_indptr, kv_indptr, batch_size, qo_len, causal, sm_scale, out32, lse)

    return batch_prefill_ragged_kv
