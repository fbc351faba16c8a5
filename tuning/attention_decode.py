"""A decode attention template for TVM's paged KV cache (``batch_decode_paged_kv``), searched like prefill.

TVM's decode kernel (``_attention_decode`` in ``tvm.relax.frontend.nn.llm._decode_kernels``) runs
one block of 512 threads per (sequence, KV head) for GPT-2 small (16 lanes x 32 token rows), walks
the context 64 tokens per iteration through shared memory (a block-wide barrier per iteration) and
finishes with a *serial* 32-step merge of the rows' softmax states. On an H200 that is 7.6 µs per
layer at batch 1 with ~200 tokens of context.

This module writes the same kernel — same 13 parameters, same buffer declarations, same
``output`` and base-2 ``lse`` — with another schedule, one block per (sequence, head) still (the
grid can only be ``B x H``: the KV cache passes no workspace for a split-KV merge):

* a block is ``groups`` token groups of ``lanes`` threads (``lanes * vec = d``, ``vec`` elements
  = 8 bytes per lane: 16 lanes of 4 fp16 for a 64-wide head); group ``g`` takes ``tokens``
  consecutive tokens (one page lookup: they share a page) of every ``groups * tokens`` of the
  context, loading K and V straight from global memory into registers (all loads of an
  iteration issued before the math), and keeps its own online-softmax state (no barrier in the
  loop; the score's sum over the lanes is a warp-shuffle butterfly);
* the groups' states are merged by a log2-depth tree through shared memory.

Searched constants (:class:`DecodeConfig`): ``groups`` (4 ... 64; threads = groups * lanes <= 1024)
and ``tokens`` (1, 2, 4, 8; divides the page size 16). TVM's own kernel is candidate 0 (config
``None``).

Semantics kept from TVM's kernel: page size 16 (the KV cache is compiled for it); ``length_info``
is the last-page length per sequence (the non-sliding-window form), so a sequence's context is
``(pages - 1) * 16 + last_page_len``; scores are scaled by ``sm_scale * log2(e)`` and ``lse`` is
``max + log2(sum exp2(score - max))`` (natural lse = ``lse * ln 2``); a sequence with no pages
gets output 0 and ``lse = -5e4`` (TVM's initial state). Slots of a page past the context are
never read into the result (they may hold anything, NaN included).

Not supported: rotary embedding inside the kernel (``rotary_mode == 1``; GPT-2 has learned
positions and its KV cache passes 0 — another value fails the kernel's host-side assertion) and
grouped-query keys (``h_q != h_kv``: :func:`make_decode_kernel` raises; candidates are then only
TVM's kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from gpt2_model.wgmma_gemm import DSMEM_LD_SRC, PDL_SYNC, PDL_SYNC_SRC

from .attention_decode_ref import (DECODE_LSE_ATOL, DECODE_OUT_RTOL, EMPTY_LSE, MIXED_CASE, PAGE_SIZE,  # noqa: F401
                                   DecodeInputs, decode_case_name, decode_cases, decode_scalars, paged_decode_args,
                                   reference_paged_decode)
from .targets import cuda_sm_at_least

__all__ = ["DECODE_KERNEL", "DECODE_LSE_ATOL", "DECODE_OUT_RTOL", "MIXED_CASE", "PAGE_SIZE", "DecodeConfig",
           "DecodeError", "DecodeInputs", "decode_candidates", "decode_case_name", "decode_cases",
           "decode_scalars", "decode_shared_bytes", "is_decode_legal", "make_decode_kernel",
           "paged_decode_args", "reference_paged_decode"]

DECODE_KERNEL = "batch_decode_paged_kv"
_LINE = 128  # bytes of an L2 prefetch
# One 128-byte line into L2 (``l2``): the K/V of earlier tokens never depend on the previous kernel
# (only the newest token's, appended by it, do), so under PDL they stream in while that kernel runs.
_PREFETCH_L2_SRC = r"""
__device__ __forceinline__ void gpt2k_prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}
"""
_LOG2E = math.log2(math.e)
_EMPTY_LSE = EMPTY_LSE


class DecodeError(ValueError):
    """A configuration or key the decode template does not support."""


@dataclass(frozen=True)
class DecodeConfig:
    """The template constants of the decode kernel."""

    groups: int  # token groups per block (threadIdx.y), each with its own softmax state
    tokens: int  # consecutive tokens per group per iteration (same page)
    split: int = 1  # CTAs of a thread block cluster per (sequence, head), each taking every split-th iteration
    split_below: int = 0  # > 0: split only while batch x heads < split_below (a launch-time choice), else 1 CTA
    wide: bool = False  # 16-byte loads (8 fp16 values a lane, 8 lanes a 64-wide row) instead of 8-byte ones
    prefetch: bool = False  # the next iteration's K/V loads issued before this iteration's math
    l2: bool = False  # the context's K/V lines prefetched to L2 first, then the PDL wait (PDL_SYNC; sm_90+, unsplit)

    def label(self) -> str:
        text = (f"decode groups={self.groups} tokens={self.tokens}" + (" wide" if self.wide else "")
                + (" prefetch" if self.prefetch else "") + (" l2" if self.l2 else ""))
        if self.split > 1:
            text += f" split={self.split}" + (f" below {self.split_below} blocks" if self.split_below else "")
        return text


def _vec_lanes(key, wide: bool = False) -> tuple[int, int]:
    """(elements per 8-byte load, or 16-byte with ``wide``; lanes per token row)."""
    elem = 2 if "16" in str(key.dtype) else 4
    vec = (16 if wide else 8) // elem
    return vec, key.d // vec


def decode_shared_bytes(cfg: DecodeConfig, key) -> int:
    """Static shared memory of one block (bytes): the groups' output rows and (max, sum) in fp32, twice
    (the tree merge reads one copy and writes the other), and with a split one more row for the cluster merge."""
    return 2 * 4 * cfg.groups * (key.d + 2) + (4 * (key.d + 2) if cfg.split > 1 else 0)



def _limits(target) -> tuple[int, int]:
    threads, smem = 1024, 48 * 1024
    if target is not None:
        attrs = target.attrs
        for name in ("max_threads_per_block", "max_num_threads"):
            if name in attrs:
                threads = min(threads, int(attrs[name]))
                break
        if "max_shared_memory_per_block" in attrs:
            smem = int(attrs["max_shared_memory_per_block"])
    return threads, smem


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def is_decode_legal(cfg: DecodeConfig, key, target=None) -> bool:
    """Whether the template can be built for ``key`` with ``cfg``: MHA, lanes a power of two within a
    warp, groups a power of two (tree merge), tokens dividing the page, threads and static shared
    memory within the target's per-block limits; a split (2, 4 or 8 CTAs, a portable cluster) only
    on an sm_90+ CUDA target."""
    vec, lanes = _vec_lanes(key, cfg.wide)
    threads, smem = _limits(target)
    return (key.h_q == key.h_kv and key.d % vec == 0 and _pow2(lanes) and lanes <= 32
            and _pow2(cfg.groups) and cfg.tokens in (1, 2, 4, 8, 16)
            and (cfg.split == 1 or (cfg.split in (2, 4, 8) and cuda_sm_at_least(target, 90)))  # clusters, DSMEM
            and (not cfg.l2 or (cfg.split == 1 and cuda_sm_at_least(target, 90)))  # (PDL: sm_90+)
            and cfg.split_below >= 0 and (cfg.split > 1 or cfg.split_below == 0)
            and cfg.groups * lanes <= threads and decode_shared_bytes(cfg, key) <= smem)


#: (groups, tokens) of the split candidates: ``groups * tokens`` of 32-64 tokens per CTA iteration, so a
#: 256-token context gives every CTA of a 4-way split an iteration or two.
SPLIT_SHAPES = ((4, 8), (8, 4), (8, 8), (16, 2), (16, 4), (32, 1), (32, 2))
#: The adaptive split's threshold in (sequence, head) blocks: about the SMs of a Hopper card (132), so
#: GPT-2 small's 12 heads split up to batch 10 and run one CTA per (sequence, head) from batch 11.
SPLIT_BELOW = 132


def decode_candidates(key, target=None, *, groups: Sequence[int] = (4, 8, 16, 32, 64),
                      tokens: Sequence[int] = (1, 2, 4, 8), splits: Sequence[int] = (2, 4)) -> list:
    """``None`` (TVM's kernel) first, then the template's legal configurations of the grid (8-byte
    loads, 16-byte ones, 8-byte ones software-pipelined, L2-prefetching ones), then the cluster-split ones (``splits`` x :data:`SPLIT_SHAPES`, always and below :data:`SPLIT_BELOW` blocks;
    sm_90+ only)."""
    one = [c for w in (False, True) for g in groups for t in tokens
           if is_decode_legal(c := DecodeConfig(groups=g, tokens=t, wide=w), key, target)]
    # software-pipelined: where an iteration takes few tokens, so a context needs several
    one += [c for g in groups for t in tokens if t <= 4
            and is_decode_legal(c := DecodeConfig(groups=g, tokens=t, prefetch=True), key, target)]
    # the context's lines to L2 before the PDL wait: the shapes that won so far (groups 8-32 x 2-4 tokens)
    one += [c for w in (False, True) for g in groups for t in tokens if 8 <= g <= 32 and 2 <= t <= 4
            and is_decode_legal(c := DecodeConfig(groups=g, tokens=t, wide=w, l2=True), key, target)]
    split = [c for below in (0, SPLIT_BELOW) for s in splits for g, t in SPLIT_SHAPES
             if is_decode_legal(c := DecodeConfig(groups=g, tokens=t, split=s, split_below=below), key, target)]
    return [None] + one + split


def _tvm_decode(key, target):
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode  # pylint: disable=import-outside-toplevel

    return _attention_decode(key.h_kv, key.h_q, key.d, key.dtype, False, {}, target)


def make_decode_kernel(cfg: DecodeConfig | None, key, target):  # pylint: disable=too-many-locals,too-many-statements
    """The ``batch_decode_paged_kv`` PrimFunc for ``key`` (an ``AttentionKey``); ``cfg`` None: TVM's.

    Raises
    ------
    DecodeError
        ``cfg`` or ``key`` is not supported (see :func:`is_decode_legal`), e.g. ``h_q != h_kv``.
    """
    if cfg is None:
        return _tvm_decode(key, target)
    if key.h_q != key.h_kv:
        raise DecodeError(f"decode template: grouped-query keys are not supported ({key.label()})")
    if not is_decode_legal(cfg, key, target):
        raise DecodeError(f"decode template {cfg.label()} is not legal for {key.label()} on this target")
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    H, D, dtype = key.h_q, key.d, key.dtype
    vec, lanes = _vec_lanes(key, cfg.wide)
    ALIGN = 16 if cfg.wide else 8  # bytes of one lane's load
    G, TT, SPLIT, BELOW, PREFETCH = cfg.groups, cfg.tokens, cfg.split, cfg.split_below, cfg.prefetch
    L2 = cfg.l2
    line = _LINE // (2 if "16" in str(dtype) else 4)  # elements of a 128-byte line
    half_lines = PAGE_SIZE * D // line  # lines of one page's K (or V) rows of one head
    per_it = G * TT  # tokens per block iteration
    lane_steps = int(math.log2(lanes))
    merge_steps = int(math.log2(G))
    page_size = PAGE_SIZE
    full = T.uint32(0xFFFFFFFF)

    def nsplit(batch):  # CTAs per (sequence, head): an expression of the batch (no let: the host computes the grid)
        return T.if_then_else(batch * H < BELOW, SPLIT, 1) if BELOW > 0 else SPLIT

    merge_loop = T.serial if BELOW > 0 else T.unroll  # the cluster merge's loop: unrolled over a constant split

    def dsmem(ptr, rank):  # one fp32 of cluster CTA ``rank``'s shared memory at ``ptr`` (mapa + ld.shared::cluster)
        return T.cuda.func_call("tvm_dsmem_ld_f32", ptr, T.uint32(rank), source_code=DSMEM_LD_SRC, return_type="float32")

    # pylint: disable=invalid-name,unused-variable,too-many-arguments
    @T.macro
    def cluster_merge(O_x: T.Buffer, md_x: T.Buffer, o_loc: T.Buffer, st: T.Buffer, tx: T.int32, r: T.int32):
        # fold cluster CTA r's (o, max, sum), read through distributed shared memory, into this CTA's
        st[2] = T.max(st[0], dsmem(md_x.access_ptr("r", offset=0), r))
        st[3] = T.exp2(st[0] - st[2])
        st[4] = T.exp2(dsmem(md_x.access_ptr("r", offset=0), r) - st[2])
        st[1] = st[1] * st[3] + dsmem(md_x.access_ptr("r", offset=1), r) * st[4]
        st[0] = st[2]
        for i in T.unroll(vec):
            o_loc[i] = o_loc[i] * st[3] + dsmem(O_x.access_ptr("r", offset=tx * vec + i), r) * st[4]

    @T.macro
    def load_kv(pages_v: T.Buffer, pg: T.int32, kv_len: T.int32, t0: T.int32, by: T.int32, tx: T.int32,
                k_buf: T.Buffer, v_buf: T.Buffer):
        # the group's TT tokens from t0 (on page pg: TT divides a page) into registers; past the context: zeros
        for j in T.unroll(TT):
            if t0 + j < kv_len:
                k_buf[T.ramp(j * vec, 1, vec)] = pages_v[pg, 0, by, t0 % page_size + j, T.ramp(tx * vec, 1, vec)]
                v_buf[T.ramp(j * vec, 1, vec)] = pages_v[pg, 1, by, t0 % page_size + j, T.ramp(tx * vec, 1, vec)]
            else:
                k_buf[T.ramp(j * vec, 1, vec)] = T.broadcast(T.cast(0, dtype), vec)
                v_buf[T.ramp(j * vec, 1, vec)] = T.broadcast(T.cast(0, dtype), vec)

    @T.macro
    def merge_step(O_src: T.Buffer, md_src: T.Buffer, O_dst: T.Buffer, md_dst: T.Buffer, o_loc: T.Buffer,
                   st: T.Buffer, ty: T.int32, tx: T.int32, stride: T.int32):
        # (the two slots are separate buffers: TVM's sync planner cannot tell two slots of one
        # buffer apart, and would want a barrier inside ``ty < stride``)
        if ty < stride:
            st[2] = T.max(st[0], md_src[ty + stride, 0])
            st[3] = T.exp2(st[0] - st[2])
            st[4] = T.exp2(md_src[ty + stride, 0] - st[2])
            st[1] = st[1] * st[3] + md_src[ty + stride, 1] * st[4]
            st[0] = st[2]
            for i in T.unroll(vec):
                o_loc[i] = o_loc[i] * st[3] + O_src[ty + stride, tx * vec + i] * st[4]
            if stride > 1:  # the last step's result stays in group 0's registers
                for i in T.unroll(vec):
                    O_dst[ty, tx * vec + i] = o_loc[i]
                if tx == 0:
                    md_dst[ty, 0] = st[0]
                    md_dst[ty, 1] = st[1]
        if stride > 1:  # (no barrier after the last step: only group 0 goes on, from registers)
            T.tvm_storage_sync("shared")

    @T.macro
    def attn_block(Q, pages_v, page_table_indptr, page_table_values, length_info, output, lse, sm_scale,
                   bx, by, cz, ns, ty, tx):
        # one CTA's work: (sequence bx, head by), cluster rank cz (0 without a split), group ty, lane tx
        with T.sblock("attn"):
            T.reads()
            T.writes()
            q_loc = T.sblock_alloc_buffer((vec,), "float32", scope="local")
            k_loc = T.sblock_alloc_buffer((TT * vec,), dtype, scope="local")
            v_loc = T.sblock_alloc_buffer((TT * vec,), dtype, scope="local")
            k_nx = T.sblock_alloc_buffer((TT * vec if PREFETCH else 1,), dtype, scope="local")
            v_nx = T.sblock_alloc_buffer((TT * vec if PREFETCH else 1,), dtype, scope="local")
            o_loc = T.sblock_alloc_buffer((vec,), "float32", scope="local")
            s_loc = T.sblock_alloc_buffer((TT,), "float32", scope="local")
            st = T.sblock_alloc_buffer((5,), "float32", scope="local")  # m, d, m_new, alpha, beta
            O_a = T.sblock_alloc_buffer((G, D), "float32", scope="shared")
            md_a = T.sblock_alloc_buffer((G, 2), "float32", scope="shared")
            O_b = T.sblock_alloc_buffer((G, D), "float32", scope="shared")
            md_b = T.sblock_alloc_buffer((G, 2), "float32", scope="shared")
            O_x = T.sblock_alloc_buffer((D if SPLIT > 1 else 1,), "float32", scope="shared")
            md_x = T.sblock_alloc_buffer((2,), "float32", scope="shared")

            page_begin: T.let[T.int32] = page_table_indptr[bx]
            page_end: T.let[T.int32] = page_table_indptr[bx + 1]
            kv_len: T.let[T.int32] = T.if_then_else(
                page_begin != page_end, (page_end - page_begin - 1) * page_size + length_info[bx], 0)
            sc: T.let[T.float32] = sm_scale * T.float32(_LOG2E)
            if L2:  # every K/V line of the context to L2 (the page table is ready: copied before the step),
                # then the PDL wait (a no-op without PDL) before the first read the previous kernel writes
                n_lines: T.let[T.int32] = (page_end - page_begin) * 2 * half_lines
                for i in T.serial(T.ceildiv(n_lines, G * lanes)):
                    idx: T.let[T.int32] = i * (G * lanes) + ty * lanes + tx
                    if idx < n_lines:
                        pg: T.let[T.int32] = page_table_values[page_begin + idx // (2 * half_lines)]
                        T.evaluate(T.cuda.func_call("gpt2k_prefetch_l2", pages_v.access_ptr(
                            "r", offset=((pg * 2 + idx // half_lines % 2) * H + by) * (page_size * D)
                            + idx % half_lines * line), source_code=_PREFETCH_L2_SRC))
                T.evaluate(T.cuda.func_call(PDL_SYNC, source_code=PDL_SYNC_SRC))
            for i in T.unroll(vec):
                q_loc[i] = T.cast(Q[bx, by, tx * vec + i], "float32") * sc
            st[0] = T.float32(_EMPTY_LSE)
            st[1] = T.float32(0)
            for i in T.unroll(vec):
                o_loc[i] = T.float32(0)
            # (with a split of ns CTAs, CTA cz of the cluster takes iterations cz, cz + ns, ...)
            if PREFETCH:  # the first iteration's K/V before the loop; each iteration then loads the next's
                first: T.let[T.int32] = cz * per_it + ty * TT
                load_kv(pages_v, T.if_then_else(first < kv_len, page_table_values[page_begin + first // page_size], 0),
                        kv_len, first, by, tx, k_loc, v_loc)
            for it in T.serial(T.ceildiv(T.ceildiv(kv_len, per_it), ns)):
                tok0: T.let[T.int32] = (it * ns + cz) * per_it + ty * TT
                if PREFETCH:  # (issued before this iteration's math; past the context: zeros, no load)
                    nxt: T.let[T.int32] = tok0 + ns * per_it
                    page_nx: T.let[T.int32] = T.if_then_else(
                        nxt < kv_len, page_table_values[page_begin + nxt // page_size], 0)
                    load_kv(pages_v, page_nx, kv_len, nxt, by, tx, k_nx, v_nx)
                else:  # all loads of the iteration first (the page's tail past the context: zeros)
                    page_no: T.let[T.int32] = T.if_then_else(
                        tok0 < kv_len, page_table_values[page_begin + tok0 // page_size], 0)
                    load_kv(pages_v, page_no, kv_len, tok0, by, tx, k_loc, v_loc)
                # scores: each lane's share, then a butterfly over the group's lanes
                for j in T.unroll(TT):
                    s_loc[j] = T.float32(0)
                    for i in T.unroll(vec):
                        s_loc[j] = s_loc[j] + q_loc[i] * T.cast(k_loc[j * vec + i], "float32")
                    for r in T.unroll(lane_steps):
                        s_loc[j] = s_loc[j] + T.tvm_warp_shuffle_xor(
                            full, s_loc[j], T.shift_left(1, r), 32, 32)
                # online softmax of this group's tokens
                st[2] = st[0]
                for j in T.unroll(TT):
                    st[2] = T.max(st[2], T.if_then_else(tok0 + j < kv_len, s_loc[j],
                                                        T.float32(_EMPTY_LSE)))
                st[3] = T.exp2(st[0] - st[2])
                st[1] = st[1] * st[3]
                for i in T.unroll(vec):
                    o_loc[i] = o_loc[i] * st[3]
                for j in T.unroll(TT):
                    st[4] = T.if_then_else(tok0 + j < kv_len, T.exp2(s_loc[j] - st[2]), T.float32(0))
                    st[1] = st[1] + st[4]
                    for i in T.unroll(vec):
                        o_loc[i] = o_loc[i] + st[4] * T.cast(v_loc[j * vec + i], "float32")
                st[0] = st[2]
                if PREFETCH:
                    for e in T.unroll(TT * vec):
                        k_loc[e] = k_nx[e]
                        v_loc[e] = v_nx[e]
            # tree merge of the groups' states (log2(G) steps): at the step of stride s,
            # group g < s takes in group g + s; states ping-pong between two shared slots
            for i in T.unroll(vec):
                O_a[ty, tx * vec + i] = o_loc[i]
            if tx == 0:
                md_a[ty, 0] = st[0]
                md_a[ty, 1] = st[1]
            T.tvm_storage_sync("shared")
            # (unrolled here: constant strides and slots; G <= 64)
            if merge_steps > 0:
                merge_step(O_a, md_a, O_b, md_b, o_loc, st, ty, tx, G >> 1)
            if merge_steps > 1:
                merge_step(O_b, md_b, O_a, md_a, o_loc, st, ty, tx, G >> 2)
            if merge_steps > 2:
                merge_step(O_a, md_a, O_b, md_b, o_loc, st, ty, tx, G >> 3)
            if merge_steps > 3:
                merge_step(O_b, md_b, O_a, md_a, o_loc, st, ty, tx, G >> 4)
            if merge_steps > 4:
                merge_step(O_a, md_a, O_b, md_b, o_loc, st, ty, tx, G >> 5)
            if merge_steps > 5:
                merge_step(O_b, md_b, O_a, md_a, o_loc, st, ty, tx, G >> 6)
            if SPLIT > 1:
                # cluster merge: CTAs 1.. park group 0's state in their shared memory, CTA 0 folds
                # them in through distributed shared memory; the second barrier keeps the others'
                # shared memory alive until CTA 0 has read it
                if cz != 0 and ty == 0:
                    for i in T.unroll(vec):
                        O_x[tx * vec + i] = o_loc[i]
                    if tx == 0:
                        md_x[0] = st[0]
                        md_x[1] = st[1]
                T.cuda.cluster_sync()
                if cz == 0 and ty == 0:
                    for r in merge_loop(1, ns):  # (ns: SPLIT, or with BELOW 1 or SPLIT, known at launch)
                        cluster_merge(O_x, md_x, o_loc, st, tx, r)
                T.cuda.cluster_sync()
            if ty == 0 and cz == 0:
                for i in T.unroll(vec):
                    output[bx, by, tx * vec + i] = T.cast(
                        T.if_then_else(st[1] > T.float32(0), o_loc[i] / st[1], T.float32(0)), dtype)
                if tx == 0:
                    lse[bx, by] = T.if_then_else(st[1] > T.float32(0), st[0] + T.log2(st[1]),
                                                 T.float32(_EMPTY_LSE))

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv"})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_elem_offset = T.int64()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, H, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H, page_size, D), dtype, elem_offset=pages_elem_offset)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, H, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H), "float32")
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)

        assert rotary_mode == 0, "tuned batch_decode_paged_kv: rotary_mode must be 0 (no RoPE in the kernel)"
        assert pages_elem_offset % vec == 0, f"tuned batch_decode_paged_kv: pages must start {ALIGN}-byte aligned"
        # the pages again, at an offset the codegen can prove 8-byte aligned: one vector load per lane
        # and token (a ramp off ``pages_elem_offset`` itself becomes ``vec`` scalar loads)
        pages_v = T.decl_buffer((max_num_pages, 2, H, page_size, D), dtype, data=pages.data,
                                elem_offset=pages_elem_offset // vec * vec)
        if SPLIT == 1:
            for bx in T.thread_binding(B, thread="blockIdx.x"):
                for by in T.thread_binding(H, thread="blockIdx.y"):
                    for ty in T.thread_binding(G, thread="threadIdx.y"):
                        for tx in T.thread_binding(lanes, thread="threadIdx.x"):
                            attn_block(Q, pages_v, page_table_indptr, page_table_values, length_info, output, lse,
                                       sm_scale, bx, by, T.int32(0), 1, ty, tx)
        else:  # a cluster of ns consecutive CTAs along x per (sequence, head); ns = SPLIT, or with
            # split_below 1 from batch x heads >= BELOW (the launch's cluster size, from B at run time)
            for bxc in T.thread_binding(B * nsplit(B), thread="blockIdx.x"):
                for by in T.thread_binding(H, thread="blockIdx.y"):
                    for cz in T.thread_binding(nsplit(B), thread="clusterCtaIdx.x"):
                        for ty in T.thread_binding(G, thread="threadIdx.y"):
                            for tx in T.thread_binding(lanes, thread="threadIdx.x"):
                                attn_block(Q, pages_v, page_table_indptr, page_table_values, length_info, output, lse,
                                           sm_scale, bxc // nsplit(B), by, cz, nsplit(B), ty, tx)

    return batch_decode_paged_kv
