"""Layer norm fused into the decode GEMV that consumes it: one kernel instead of two (issue 11 item 2).

In a decode step every layer norm feeds one linear layer: ``ln_1`` the fused QKV projection,
``ln_2`` the MLP's ``c_fc`` (+GELU), ``ln_f`` the tied lm_head (+cast to fp32). Separately they are
25 small norm kernels per step (~1.8 µs each, graph-timed, on an H200) beside the GEMVs. Here one
CUDA kernel does both: each block normalizes the step's ``B`` rows (768 values each) into shared
memory -- the loads of its weight rows are issued first, so the norm runs under their latency --
and then each warp computes ``rows`` output columns for all ``B`` rows from that shared copy.

Same arithmetic as the unfused pair: the norm in fp32 (two passes: mean, then the mean square of
the deviations), its output rounded to the activation dtype (what the unfused norm kernel stores),
the dot products accumulated in fp32, bias, GELU (tanh form) and the cast applied to the fp32 sum.

Two forms: the CUDA-core one above, and a tensor-core one (``mma.sync`` m16n8k16 on the rows padded
to 16, K split over the block's warps and, without the norm, over a cluster's CTAs), which serves
without the norm (``prologue="none"``) for the c_proj layers (+ bias + residual) and for any linear
layer after its norm run alone. Written scheduled (``tirx.is_scheduled``); their constants
(:class:`NormGemvConfig`) are searched on the GPU by :mod:`tuning.norm_gemv_tune` against the kernels
they replace and stored in the database's ``norm_gemv.json``; the model uses them only for the static
decode shapes that file names (:class:`gpt2_model.norm_gemv_plan.NormGemvPlan`): without it, the unfused model exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

__all__ = ["EPILOGUES", "MAX_ROWS", "PROLOGUES", "NormGemvConfig", "NormGemvError", "NormGemvKey",
           "is_norm_gemv_legal", "make_norm_gemv", "norm_gemv_candidates", "norm_gemv_problem", "norm_gemv_shared_bytes"]

#: Epilogues after ``sum_k norm(x)[b, k] * W[n, k]`` (fp32): ``bias``: + bias[n]; ``bias_gelu``:
#: GELU(tanh form) of that; ``none``: nothing (the tied lm_head); ``bias_residual``: + bias[n] +
#: residual[b, n]; then the cast to the output dtype.
EPILOGUES = ("bias", "bias_gelu", "none", "bias_residual")
#: What runs before the GEMV: ``norm`` (the layer norm, fused) or ``none`` (the plain linear layer:
#: the c_proj layers with ``bias_residual``; any other layer after its norm run alone, which at
#: larger batches can beat re-normalizing the rows in every block of the fused form).
PROLOGUES = ("norm", "none")
MAX_ROWS = 32  # batch rows the kernel takes (their normalized copy lives in 48 KB of shared memory)
_LANES = 32
_VEC = 8  # fp16 elements per 16-byte load
_SHARED_LIMIT = 48 * 1024
_ACC_LIMIT = 64  # fp32 accumulators per thread (rows x batch)


class NormGemvError(ValueError):
    """A shape or configuration the fused norm + GEMV kernel does not support."""


@dataclass(frozen=True)
class NormGemvKey:
    """What one fused kernel computes: ``batch`` rows of ``k`` -> ``n`` columns."""

    batch: int
    k: int
    n: int
    epilogue: str
    dtype: str = "float16"
    out_dtype: str = "float16"
    prologue: str = "norm"

    def label(self) -> str:
        what = "norm+gemv" if self.prologue == "norm" else "gemv"
        return f"{what} b{self.batch} {self.k}->{self.n} {self.epilogue} {self.dtype}->{self.out_dtype}"

    def name(self) -> str:
        return f"b{self.batch}_k{self.k}_n{self.n}_{self.epilogue}" + ("" if self.prologue == "norm" else "_plain")


@dataclass(frozen=True)
class NormGemvConfig:
    """The kernel's constants.

    CUDA-core form (``mma=False``): ``warps`` per block, ``rows`` output columns per warp.
    Tensor-core form (``mma=True``, ``mma.sync`` m16n8k16, batch rows padded to 16): ``warps`` split
    the K dimension inside a block (their partial sums meet in shared memory), ``rows`` is the
    number of 8-column tiles of the block; without the norm, ``cluster`` (2 or 4) CTAs of a thread
    block cluster split K once more (CTA 0 adds the others' sums through distributed shared memory):
    a 768-column output is only 96 one-tile blocks, too few for a card of 132 SMs."""

    warps: int
    rows: int
    mma: bool = False
    cluster: int = 1  # tensor-core plain form: CTAs of a thread block cluster splitting K further (sm_90+)
    wide: bool = False  # tensor-core form: weight fragments by 16-byte loads (K permuted alike in A and W)

    def label(self) -> str:
        if self.mma:
            return f"norm_gemv mma ksplit={self.warps} tiles={self.rows}" + (
                f" cluster={self.cluster}" if self.cluster > 1 else "") + (" wide" if self.wide else "")
        return f"norm_gemv warps={self.warps} rows={self.rows}"


def norm_gemv_shared_bytes(key: NormGemvKey) -> int:
    return key.batch * key.k * 2


def _key_problem(key: NormGemvKey, *, reference: bool = False) -> str | None:
    if key.epilogue not in EPILOGUES:
        return f"epilogue {key.epilogue!r} is not one of {EPILOGUES}"
    if key.prologue not in PROLOGUES:
        return f"prologue {key.prologue!r} is not one of {PROLOGUES}"
    if key.epilogue == "bias_residual" and key.prologue != "none":
        return "the residual epilogue goes with the plain prologue only"
    if reference:  # the plain form takes any shape and float dtype
        return None
    if key.dtype != "float16":
        return f"activation dtype {key.dtype} (only float16)"
    if key.out_dtype not in ("float16", "float32"):
        return f"output dtype {key.out_dtype}"
    if not 1 <= key.batch <= MAX_ROWS:
        return f"batch {key.batch} (1..{MAX_ROWS})"
    if key.prologue == "none":
        return None if key.k % 16 == 0 else f"k={key.k} is not a multiple of 16"
    if key.k % (_LANES * _VEC) != 0:
        return f"k={key.k} is not a multiple of {_LANES * _VEC}"
    if norm_gemv_shared_bytes(key) > _SHARED_LIMIT:
        return f"{norm_gemv_shared_bytes(key)} bytes of shared memory (limit {_SHARED_LIMIT})"
    return None


def _mma_shape(key: NormGemvKey) -> tuple[int, int]:
    """(16-row tiles of the batch, 16-wide K steps)."""
    return (key.batch + 15) // 16, key.k // 16


def is_norm_gemv_legal(cfg: NormGemvConfig, key: NormGemvKey) -> bool:
    if _key_problem(key) is not None or cfg.rows < 1:
        return False
    if not cfg.mma:
        return (key.prologue == "norm" and cfg.cluster == 1 and not cfg.wide and cfg.warps in (1, 2, 4, 8, 16)
                and cfg.rows * key.batch <= _ACC_LIMIT)
    mt, ks = _mma_shape(key)
    if cfg.warps not in (2, 4, 8, 16) or cfg.rows not in (1, 2, 4, 8) or ks % (cfg.warps * cfg.cluster):
        return False
    if cfg.cluster not in (1, 2, 4) or (cfg.cluster > 1 and key.prologue != "none"):
        return False
    steps = ks // (cfg.warps * cfg.cluster)
    if cfg.wide and steps % 4:  # (16-byte loads take 4 K steps' words at once)
        return False
    red_bytes = cfg.warps * mt * 16 * cfg.rows * 8 * 4  # the warps' partial sums
    # (with the norm they reuse the normalized rows' space, else they have their own)
    room = mt * 16 * key.k * 2 if key.prologue == "norm" else _SHARED_LIMIT
    return (steps * cfg.rows * 2 <= _ACC_LIMIT  # prefetched weight fragments (32-bit registers)
            and mt * cfg.rows * 4 <= _ACC_LIMIT and room <= _SHARED_LIMIT and red_bytes <= room)


def norm_gemv_problem(cfg: NormGemvConfig, key: NormGemvKey) -> str | None:
    """Why ``cfg`` cannot make a kernel for ``key`` (None: it can)."""
    problem = _key_problem(key)
    if problem is None and not is_norm_gemv_legal(cfg, key):
        problem = f"{cfg.label()} is not legal"
    return problem


def norm_gemv_candidates(key: NormGemvKey, *, warps=(2, 4, 8, 16), rows=(1, 2, 4), mma_tiles=(1, 2, 4, 8),
                         clusters=(1,)) -> list[NormGemvConfig]:
    """Every legal configuration of ``key``, both forms (empty when the key itself is unsupported);
    ``clusters`` above 1 (sm_90+ targets only: thread block clusters) add the plain form's cluster split."""
    cands = [NormGemvConfig(w, r) for w in warps for r in rows] if key.prologue == "norm" else []
    cands += [NormGemvConfig(w, t, mma=True, cluster=c, wide=v) for v in (False, True) for w in warps
              for t in mma_tiles for c in clusters
              if c == 1 or -(-key.n // (8 * t)) < 256]  # (a cluster is for more CTAs where blocks are few)
    return [c for c in cands if is_norm_gemv_legal(c, key)]


def make_norm_gemv(cfg: NormGemvConfig, key: NormGemvKey, *, eps: float, name: str = "norm_gemv"):
    """The scheduled PrimFunc ``(x (B,1,K), gamma (K,), beta (K,), W (N,K)[, bias (N,)], out (B,1,N))``;
    with the plain prologue ``(x, W[, bias[, residual]], out)`` (as the epilogue needs).

    Raises
    ------
    NormGemvError
        The key or the configuration is not supported.
    """
    problem = norm_gemv_problem(cfg, key)
    if problem is not None:
        raise NormGemvError(f"fused norm + GEMV ({key.label()}): {problem}")
    return _scheduled(cfg, key, float(eps)).with_attr("global_symbol", name)


@functools.lru_cache(maxsize=1024)
def _scheduled(cfg: NormGemvConfig, key: NormGemvKey, eps: float):
    """One kernel per (configuration, key, eps) and process: parsing the TVMScript is what costs (~0.3 s a
    kernel on 2 cores), and a gpt2 export asks for the same ~20 kernels at every layer of every entry
    point (331 calls: most of a library build's time before this). PrimFuncs are immutable: sharing is safe."""
    make = _make_norm_gemv_mma if cfg.mma else _make_norm_gemv_simt
    return make(cfg, key, eps=eps)


def _pieces(key: NormGemvKey, *, eps: float, warps: int, padded_rows: int, swizzle: bool = False):
    """What both forms share, as TVMScript macros: the warp butterfly sum, the norm parameters'
    load, the norm of the batch rows into shared memory (one warp per row; rows past the batch zeroed;
    with ``swizzle`` chunk ``c`` of row ``r`` stored at chunk ``c ^ (r % 8)``: conflict-free fragment
    loads), the epilogue of one output value, and the PrimFunc around a body."""
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    B, K, N, dtype, out_dtype = key.batch, key.k, key.n, key.dtype, key.out_dtype
    KV, VEC = K // (_LANES * _VEC), _VEC  # 16-byte vectors per lane along K
    norm_iters = (padded_rows + warps - 1) // warps
    has_bias, gelu, residual = key.epilogue != "none", key.epilogue == "bias_gelu", key.epilogue == "bias_residual"
    inv_k = 1.0 / K
    full = T.uint32(0xFFFFFFFF)

    def chunk(c, row):  # where the 16-byte chunk c of a row is stored
        return T.bitwise_xor(c, row % 8) if swizzle else c

    # pylint: disable=invalid-name,too-many-arguments
    @T.macro
    def butterfly(buf: T.Buffer, i: T.int32):
        for r in T.unroll(5):
            buf[i] = buf[i] + T.tvm_warp_shuffle_xor(full, buf[i], T.shift_left(1, r), 32, 32)

    @T.macro
    def load_params(gamma: T.Buffer, beta: T.Buffer, g_loc: T.Buffer, be_loc: T.Buffer, tx: T.int32):
        for j in T.unroll(KV):
            g_loc[T.ramp(j * VEC, 1, VEC)] = gamma[T.ramp((j * _LANES + tx) * VEC, 1, VEC)]
            be_loc[T.ramp(j * VEC, 1, VEC)] = beta[T.ramp((j * _LANES + tx) * VEC, 1, VEC)]

    @T.macro
    def norm_rows(x: T.Buffer, g_loc: T.Buffer, be_loc: T.Buffer, xn: T.Buffer, h_loc: T.Buffer, x_loc: T.Buffer,
                  n_loc: T.Buffer, st: T.Buffer, ty: T.int32, tx: T.int32):
        for it in T.serial(norm_iters):
            if it * warps + ty < B:
                for j in T.unroll(KV):
                    h_loc[T.ramp(j * VEC, 1, VEC)] = x[it * warps + ty, 0, T.ramp((j * _LANES + tx) * VEC, 1, VEC)]
                st[0] = T.float32(0)  # st: sum, mean, rstd
                for e in T.unroll(KV * VEC):
                    x_loc[e] = T.cast(h_loc[e], "float32")
                    st[0] = st[0] + x_loc[e]
                butterfly(st, 0)
                st[1] = st[0] * T.float32(inv_k)
                st[0] = T.float32(0)
                for e in T.unroll(KV * VEC):
                    x_loc[e] = x_loc[e] - st[1]
                    st[0] = st[0] + x_loc[e] * x_loc[e]
                butterfly(st, 0)
                st[2] = T.rsqrt(st[0] * T.float32(inv_k) + T.float32(eps))
                for j in T.unroll(KV):
                    for e in T.unroll(VEC):
                        n_loc[e] = T.cast(x_loc[j * VEC + e] * st[2] * T.cast(g_loc[j * VEC + e], "float32")
                                          + T.cast(be_loc[j * VEC + e], "float32"), dtype)
                    xn[it * warps + ty, T.ramp(chunk(j * _LANES + tx, it * warps + ty) * VEC, 1, VEC)] = n_loc[
                        T.ramp(0, 1, VEC)]
            elif it * warps + ty < padded_rows:
                for j in T.unroll(KV):
                    xn[it * warps + ty, T.ramp((j * _LANES + tx) * VEC, 1, VEC)] = T.broadcast(T.cast(0, dtype), VEC)

    @T.macro
    def epilogue(v: T.Buffer, i: T.int32, bias: T.Buffer, res: T.Buffer, out: T.Buffer, row: T.int32, col: T.int32):
        if has_bias:
            v[i] = v[i] + T.cast(bias[col], "float32")
        if residual:
            v[i] = v[i] + T.cast(res[row, 0, col], "float32")
        if gelu:
            v[i] = T.float32(0.5) * v[i] * (T.float32(1) + T.tanh(
                T.float32(0.7978845608028654) * (v[i] + T.float32(0.044715) * v[i] * v[i] * v[i])))
        out[row, 0, col] = T.cast(v[i], out_dtype)

    def wrap(body):
        """The PrimFunc around ``body(x, gamma, beta, W, bias, residual, out)``: parameters
        ``(x, gamma, beta, W[, bias], out)`` with the norm, ``(x, W[, bias[, residual]], out)``
        without (a parameter the body never reads is passed as another buffer)."""
        # (the parser reads the annotations' names from this frame's locals)
        B, K, N, dtype, out_dtype = key.batch, key.k, key.n, key.dtype, key.out_dtype  # pylint: disable=redefined-outer-name
        if residual:
            @T.prim_func(s_tir=True)
            def func(x: T.Buffer((B, 1, K), dtype), W: T.Buffer((N, K), dtype), bias: T.Buffer((N,), dtype),
                     res: T.Buffer((B, 1, N), dtype), out: T.Buffer((B, 1, N), out_dtype)):
                T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
                body(x, bias, bias, W, bias, res, out)
        elif key.prologue == "none" and has_bias:
            @T.prim_func(s_tir=True)
            def func(x: T.Buffer((B, 1, K), dtype), W: T.Buffer((N, K), dtype), bias: T.Buffer((N,), dtype),
                     out: T.Buffer((B, 1, N), out_dtype)):
                T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
                body(x, bias, bias, W, bias, out, out)
        elif key.prologue == "none":
            @T.prim_func(s_tir=True)
            def func(x: T.Buffer((B, 1, K), dtype), W: T.Buffer((N, K), dtype), out: T.Buffer((B, 1, N), out_dtype)):
                T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
                body(x, W, W, W, W, out, out)
        elif has_bias:
            @T.prim_func(s_tir=True)
            def func(x: T.Buffer((B, 1, K), dtype), gamma: T.Buffer((K,), dtype), beta: T.Buffer((K,), dtype),
                     W: T.Buffer((N, K), dtype), bias: T.Buffer((N,), dtype), out: T.Buffer((B, 1, N), out_dtype)):
                T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
                body(x, gamma, beta, W, bias, out, out)
        else:
            @T.prim_func(s_tir=True)
            def func(x: T.Buffer((B, 1, K), dtype), gamma: T.Buffer((K,), dtype), beta: T.Buffer((K,), dtype),
                     W: T.Buffer((N, K), dtype), out: T.Buffer((B, 1, N), out_dtype)):
                T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
                body(x, gamma, beta, W, W, out, out)
        return func

    return butterfly, load_params, norm_rows, epilogue, wrap


def _make_norm_gemv_simt(cfg: NormGemvConfig, key: NormGemvKey, *, eps: float):
    """The CUDA-core form: each warp takes ``rows`` output columns; its lanes split K, the dot
    products of every batch row are summed by warp butterflies."""
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    B, K, N, dtype = key.batch, key.k, key.n, key.dtype
    WARPS, ROWS = cfg.warps, cfg.rows
    KV, VEC = K // (_LANES * _VEC), _VEC
    blocks = (N + WARPS * ROWS - 1) // (WARPS * ROWS)
    butterfly, load_params, norm_rows, epilogue, wrap = _pieces(key, eps=eps, warps=WARPS, padded_rows=B)

    # pylint: disable=invalid-name,unused-variable,too-many-locals
    @T.macro
    def body(x: T.Buffer, gamma: T.Buffer, beta: T.Buffer, W: T.Buffer, bias: T.Buffer, res: T.Buffer, out: T.Buffer):
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for ty in T.thread_binding(WARPS, thread="threadIdx.y"):
                for tx in T.thread_binding(_LANES, thread="threadIdx.x"):
                    with T.sblock("norm_gemv"):
                        T.reads()
                        T.writes()
                        xn = T.sblock_alloc_buffer((B, K), dtype, scope="shared")
                        w_loc = T.sblock_alloc_buffer((ROWS * KV * VEC,), dtype, scope="local")
                        h_loc = T.sblock_alloc_buffer((KV * VEC,), dtype, scope="local")
                        g_loc = T.sblock_alloc_buffer((KV * VEC,), dtype, scope="local")
                        be_loc = T.sblock_alloc_buffer((KV * VEC,), dtype, scope="local")
                        x_loc = T.sblock_alloc_buffer((KV * VEC,), "float32", scope="local")
                        n_loc = T.sblock_alloc_buffer((VEC,), dtype, scope="local")
                        acc = T.sblock_alloc_buffer((ROWS * B,), "float32", scope="local")
                        st = T.sblock_alloc_buffer((3,), "float32", scope="local")
                        col0: T.let[T.int32] = (bx * WARPS + ty) * ROWS
                        # 1. this warp's weight rows: issued first, the norm runs under their latency
                        for r in T.unroll(ROWS):
                            for j in T.unroll(KV):
                                if col0 + r < N:
                                    w_loc[T.ramp((r * KV + j) * VEC, 1, VEC)] = W[col0 + r, T.ramp(
                                        (j * _LANES + tx) * VEC, 1, VEC)]
                                else:
                                    w_loc[T.ramp((r * KV + j) * VEC, 1, VEC)] = T.broadcast(T.cast(0, dtype), VEC)
                        load_params(gamma, beta, g_loc, be_loc, tx)
                        # 2. the norm of the step's rows into shared memory
                        norm_rows(x, g_loc, be_loc, xn, h_loc, x_loc, n_loc, st, ty, tx)
                        T.tvm_storage_sync("shared")
                        # 3. the dot products of this warp's columns with every normalized row
                        for i in T.unroll(ROWS * B):
                            acc[i] = T.float32(0)
                        for j in T.unroll(KV):
                            for b in T.unroll(B):
                                n_loc[T.ramp(0, 1, VEC)] = xn[b, T.ramp((j * _LANES + tx) * VEC, 1, VEC)]
                                for r in T.unroll(ROWS):
                                    for e in T.unroll(VEC):
                                        acc[r * B + b] = acc[r * B + b] + T.cast(n_loc[e], "float32") * T.cast(
                                            w_loc[(r * KV + j) * VEC + e], "float32")
                        for i in T.unroll(ROWS * B):
                            butterfly(acc, i)
                        # 4. epilogue: value i of the warp is written by lane i % 32
                        for i in T.unroll(ROWS * B):
                            if tx == i % _LANES and col0 + i // B < N:
                                epilogue(acc, i, bias, res, out, i % B, col0 + i // B)

    return wrap(body)


def _make_norm_gemv_mma(cfg: NormGemvConfig, key: NormGemvKey, *, eps: float):
    """The tensor-core form: the block normalizes the batch rows (padded with zero rows to 16) into
    shared memory (16-byte chunks XOR-swizzled by row), each warp runs ``mma.sync`` m16n8k16 over its
    share of K for the block's ``rows`` 8-column tiles (weight fragments loaded before the norm), and
    the warps' fp32 sums meet in shared memory for the epilogue. Without the norm the A fragments come
    from the input rows in global memory, and with ``cluster`` C > 1 the C CTAs of a cluster split K:
    CTA 0 adds the others' sums through distributed shared memory between two cluster barriers."""
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    from .wgmma_gemm import DSMEM_LD_SRC, PDL_SYNC, PDL_SYNC_SRC  # pylint: disable=import-outside-toplevel

    B, K, N, dtype = key.batch, key.k, key.n, key.dtype
    W, NT, C, WIDE = cfg.warps, cfg.rows, cfg.cluster, cfg.wide
    MT, KS = _mma_shape(key)
    SW = KS // (W * C)  # K steps per warp
    NB = NT * 8  # columns per block
    RB = MT * 16  # padded rows
    KV, VEC = K // (_LANES * _VEC), _VEC
    blocks = (N + NB - 1) // NB
    out_iters = (B * NB + W * _LANES - 1) // (W * _LANES)
    norm = key.prologue == "norm"
    _, load_params, norm_rows, epilogue, wrap = _pieces(key, eps=eps, warps=W, padded_rows=RB, swizzle=True)
    # shared memory: the normalized rows (norm), or just room for the partial sums (which alias it)
    shared = (RB, K) if norm else (1, W * RB * NB * 2)

    def kword(k0, s, h, tx):  # the 32-bit word (k pair) lane tx takes for half h of its K step s
        if WIDE:  # lane q's words of 4 steps contiguous: q * 8 + (s % 4) * 2 + h in each 32-word chunk
            return (k0 + s // 4 * 4) * 8 + tx % 4 * 8 + s % 4 * 2 + h
        return (k0 + s) * 8 + h * 4 + tx % 4

    def dsmem(ptr, rank):  # one fp32 of cluster CTA ``rank``'s shared memory at ``ptr``
        return T.cuda.func_call("tvm_dsmem_ld_f32", ptr, T.uint32(rank), source_code=DSMEM_LD_SRC,
                                return_type="float32")

    # pylint: disable=invalid-name,unused-variable,too-many-locals,too-many-arguments
    @T.macro
    def block(x: T.Buffer, gamma: T.Buffer, beta: T.Buffer, Wt: T.Buffer, bias: T.Buffer, res: T.Buffer,
              out: T.Buffer, bx: T.int32, cz: T.int32, ty: T.int32, tx: T.int32):
        with T.sblock("norm_gemv_mma"):
            T.reads()
            T.writes()
            xn = T.sblock_alloc_buffer(shared, dtype, scope="shared")
            part = T.sblock_alloc_buffer((B * NB if C > 1 else 1,), "float32", scope="shared")
            red = T.decl_buffer((W, RB, NB), "float32", data=xn.data, scope="shared")
            # fragments as 32-bit registers (two halves each), loaded through 32-bit views
            xn32 = T.decl_buffer((RB, K // 2), "uint32", data=xn.data, scope="shared")
            x32 = T.decl_buffer((B, K // 2), "uint32", data=x.data)
            w32 = T.decl_buffer((N, K // 2), "uint32", data=Wt.data)
            b_frag = T.sblock_alloc_buffer((SW * NT * 2,), "uint32", scope="local")
            wv = T.sblock_alloc_buffer((8 if WIDE else 1,), "uint32", scope="local")
            a_frag = T.sblock_alloc_buffer((MT * 4,), "uint32", scope="local")
            acc = T.sblock_alloc_buffer((MT * NT * 4,), "float32", scope="local")
            h_loc = T.sblock_alloc_buffer((KV * VEC,), dtype, scope="local")
            g_loc = T.sblock_alloc_buffer((KV * VEC,), dtype, scope="local")
            be_loc = T.sblock_alloc_buffer((KV * VEC,), dtype, scope="local")
            x_loc = T.sblock_alloc_buffer((KV * VEC,), "float32", scope="local")
            n_loc = T.sblock_alloc_buffer((VEC,), dtype, scope="local")
            st = T.sblock_alloc_buffer((3,), "float32", scope="local")
            v = T.sblock_alloc_buffer((1,), "float32", scope="local")
            col0: T.let[T.int32] = bx * NB
            k0: T.let[T.int32] = (cz * W + ty) * SW  # this warp's first K step
            # 1. this warp's weight fragments (B operand: k pairs of column tx // 4; wide: the 8 words a lane
            # takes from 4 K steps are made contiguous by permuting K alike in A and W, two 16-byte loads)
            if WIDE:
                for c in T.unroll(SW // 4):
                    for t in T.unroll(NT):
                        if col0 + t * 8 + tx // 4 < N:
                            for u in T.unroll(2):
                                wv[T.ramp(u * 4, 1, 4)] = w32[col0 + t * 8 + tx // 4,
                                                              T.ramp((k0 + c * 4) * 8 + tx % 4 * 8 + u * 4, 1, 4)]
                        else:
                            for e in T.unroll(8):
                                wv[e] = T.uint32(0)
                        for e in T.unroll(8):
                            b_frag[((c * 4 + e // 2) * NT + t) * 2 + e % 2] = wv[e]
            else:
                for s in T.unroll(SW):
                    for t in T.unroll(NT):
                        for h in T.unroll(2):
                            if col0 + t * 8 + tx // 4 < N:
                                b_frag[(s * NT + t) * 2 + h] = w32[col0 + t * 8 + tx // 4, kword(k0, s, h, tx)]
                            else:
                                b_frag[(s * NT + t) * 2 + h] = T.uint32(0)
            T.evaluate(T.cuda.func_call(PDL_SYNC, source_code=PDL_SYNC_SRC))  # (the weights never wait)
            if norm:
                load_params(gamma, beta, g_loc, be_loc, tx)
                # 2. the norm of the batch rows into shared memory (rows past the batch: zeros)
                norm_rows(x, g_loc, be_loc, xn, h_loc, x_loc, n_loc, st, ty, tx)
                T.tvm_storage_sync("shared")
            # 3. mma.sync over this warp's K steps
            for i in T.unroll(MT * NT * 4):
                acc[i] = T.float32(0)
            for s in T.unroll(SW):
                for m in T.unroll(MT):
                    for i in T.unroll(4):  # A: rows tx // 4 (+8), k pairs tx % 4 (+8)
                        if norm:  # (swizzled 16-byte chunks: chunk kword // 4 of the row at chunk ^ (row % 8))
                            a_frag[m * 4 + i] = xn32[m * 16 + tx // 4 + i % 2 * 8, T.bitwise_xor(
                                kword(k0, s, i // 2, tx) // 4, tx // 4) * 4 + kword(k0, s, i // 2, tx) % 4]
                        else:
                            a_frag[m * 4 + i] = T.if_then_else(
                                m * 16 + tx // 4 + i % 2 * 8 < B,
                                x32[T.min(m * 16 + tx // 4 + i % 2 * 8, B - 1), kword(k0, s, i // 2, tx)],
                                T.uint32(0))
                for m in T.unroll(MT):
                    for t in T.unroll(NT):
                        T.evaluate(T.ptx_legacy.mma(
                            "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                            a_frag.data, m * 4, b_frag.data, (s * NT + t) * 2,
                            acc.data, (m * NT + t) * 4, False, dtype="float32"))
            # 4. the warps' partial sums meet in shared memory (over the normalized rows)
            T.tvm_storage_sync("shared")
            for m in T.unroll(MT):
                for t in T.unroll(NT):
                    for i in T.unroll(4):
                        red[ty, m * 16 + tx // 4 + i // 2 * 8, t * 8 + tx % 4 * 2 + i % 2] = acc[(m * NT + t) * 4 + i]
            T.tvm_storage_sync("shared")
            for it in T.serial(out_iters):
                if (it * W + ty) * _LANES + tx < B * NB:
                    v[0] = T.float32(0)
                    for w in T.unroll(W):
                        v[0] = v[0] + red[w, ((it * W + ty) * _LANES + tx) // NB, ((it * W + ty) * _LANES + tx) % NB]
                    if C > 1:
                        part[(it * W + ty) * _LANES + tx] = v[0]
                    elif col0 + ((it * W + ty) * _LANES + tx) % NB < N:
                        epilogue(v, 0, bias, res, out, ((it * W + ty) * _LANES + tx) // NB,
                                 col0 + ((it * W + ty) * _LANES + tx) % NB)
            if C > 1:  # 5. CTA 0 adds the others' sums; the 2nd barrier keeps their shared memory alive
                T.cuda.cluster_sync()
                if cz == 0:
                    for it in T.serial(out_iters):
                        if (it * W + ty) * _LANES + tx < B * NB:
                            v[0] = part[(it * W + ty) * _LANES + tx]
                            for r in T.unroll(1, C):
                                v[0] = v[0] + dsmem(part.access_ptr("r", offset=(it * W + ty) * _LANES + tx), r)
                            if col0 + ((it * W + ty) * _LANES + tx) % NB < N:
                                epilogue(v, 0, bias, res, out, ((it * W + ty) * _LANES + tx) // NB,
                                         col0 + ((it * W + ty) * _LANES + tx) % NB)
                T.cuda.cluster_sync()

    @T.macro
    def body(x: T.Buffer, gamma: T.Buffer, beta: T.Buffer, Wt: T.Buffer, bias: T.Buffer, res: T.Buffer, out: T.Buffer):
        if C == 1:
            for bx in T.thread_binding(blocks, thread="blockIdx.x"):
                for ty in T.thread_binding(W, thread="threadIdx.y"):
                    for tx in T.thread_binding(_LANES, thread="threadIdx.x"):
                        block(x, gamma, beta, Wt, bias, res, out, bx, T.int32(0), ty, tx)
        else:  # clusters of C consecutive CTAs along x, one per column block
            for bxc in T.thread_binding(blocks * C, thread="blockIdx.x"):
                for cz in T.thread_binding(C, thread="clusterCtaIdx.x"):
                    for ty in T.thread_binding(W, thread="threadIdx.y"):
                        for tx in T.thread_binding(_LANES, thread="threadIdx.x"):
                            block(x, gamma, beta, Wt, bias, res, out, bxc // C, cz, ty, tx)

    return wrap(body)
