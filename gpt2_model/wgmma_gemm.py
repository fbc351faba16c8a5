"""A Hopper ``wgmma`` GEMM in TVM 0.27's TIRx CUDA dialect: ``C = epilogue(A @ W^T)`` (issue 13 item 2).

Shapes: ``A[M, K]`` fp16, ``W[N, K]`` fp16 (the ``nn.Linear`` layout, so both operands are
K-major, which is what ``wgmma`` reads without transposes), ``bias[N]`` fp16, ``C[M, N]`` fp16,
fp32 accumulation. Epilogues (:data:`EPILOGUES`, in fp32 on the accumulator, one rounding to
fp16 at the store): ``none``; ``bias``; ``bias_gelu`` (GELU, tanh form, of the sum);
``bias_residual`` (+ ``R[M, N]``, the residual stream). With ``batch_dim`` the buffers are
``(1, M, K)`` / ``(1, M, N)``: a prefill chunk's activations as the model holds them; with
``rows`` ``(M, 1, K)`` / ``(M, 1, N)``: a decode batch's. ``M`` need not fill the last row tile
(a decode batch of 16-64 rows in a 64-row tile): TMA fills the missing rows with zeros and the
epilogue stores only the rows that exist.

The model (:mod:`gpt2_model.model`) calls it for the prefill GEMMs of the static chunk lengths a
:class:`~gpt2_model.wgmma_plan.GemmPlan` names (from the database's ``wgmma_gemm.json``, searched on the card by
:mod:`tuning.wgmma_tune`); everything else keeps the partition's kernels.

The kernel is a plain TIRx ``PrimFunc`` (``tir_pipeline="tirx"``) written with ``T.ptx[...]`` and
``T.cuda.*`` (TVM 0.27's tile-level ``gemm_async`` dispatches to Blackwell only). One output tile
per CTA: the host encodes two TMA descriptors (A, W; 128-byte swizzle, boxes ``64 x tile_rows``);
``stages`` ring slots in one dynamic shared arena with ``full``/``empty`` mbarriers; a producer
(an extra warpgroup with ``setmaxnreg`` when ``warp_specialized``, else thread 0 ``stages - 1``
tiles ahead) issues ``cp.async.bulk.tensor.2d`` loads; ``consumers`` warpgroups of 64 or 128 rows
issue ``wgmma.mma_async m64n{tile_n}k16`` (SW128 K-major descriptors) with one group in flight;
the epilogue goes registers -> fp32 epilogue -> ``cvt.rn.f16x2.f32`` -> 4-byte global stores.
* split-K (``split`` > 1): a thread block cluster of ``split`` CTAs per output tile, summed
  through distributed shared memory into the first CTA, which runs the epilogue.

TVM 0.27 quirks met here (``T.cuda.wgmma.noop_barrier`` broken, ``scale_d`` a ``.pred``, sm_90a
only, one TIR pipeline per ``tvm.compile``, CUDA source compiled at load on CPU-built libraries):
``.notes/wgmma.md``; building: :mod:`gpt2_model.wgmma_build`.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import tvm
from tvm.script import tirx as T

#: The target every kernel here is built for (wgmma needs the "a" variant of sm_90).
SM90A = {"kind": "cuda", "arch": "sm_90a"}
#: PrimFunc attribute marking a kernel from this module (value: the config name).
KERNEL_ATTR = "tuning.wgmma_config"

#: The epilogues (see the module docstring).
EPILOGUES = ("none", "bias", "bias_gelu", "bias_residual")
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_TMA_LOAD_2D = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
_CVT_F16X2 = "cvt.rn.f16x2.f32"

#: The device function the tensor-core norm + GEMV (:mod:`gpt2_model.norm_gemv`) and this GEMM call
#: between their weight loads (here: L2 prefetches) and their first read of anything an earlier
#: kernel writes: under programmatic dependent launch (``tuning.pdl``, which then
#: adds no wait of its own to the kernel) the wait for the previous grid and the trigger of the next,
#: so an early-launched block fetches its weights while the previous kernel still runs, and a waiting
#: grid never launches its own dependent. A kernel launched without PDL passes both at once
#: (``griddepcontrol.wait`` has no grid to wait for; ``launch_dependents`` has none to launch).
PDL_SYNC = "gpt2k_pdl_sync"
PDL_SYNC_SRC = r"""
__device__ __forceinline__ void gpt2k_pdl_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
"""
# An L2 prefetch of one TMA box (no shared memory, no barrier): the weights before the PDL wait.
_TMA_PREFETCH_SRC = r"""
__device__ __forceinline__ void gpt2k_tma_prefetch_2d(unsigned long long map, int x, int y) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];"
               :: "l"(map), "r"(x), "r"(y) : "memory");
}
"""

# Register-operand fence (CUTLASS's ``warpgroup_fence_operand``): keeps nvcc from moving reads
# or writes of an accumulator register across the asynchronous wgmma that owns it.
# Split-K: one fp32 of another CTA's shared memory in the cluster (distributed shared memory).
DSMEM_LD_SRC = r"""
__device__ __forceinline__ float tvm_dsmem_ld_f32(float* p, unsigned rank) {
  unsigned a = (unsigned)__cvta_generic_to_shared(p), r;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
  return v;
}
"""

_FENCE_SRC = r"""
__device__ __forceinline__ void tvm_wgmma_fence_f32(float& r) {
  asm volatile("" : "+f"(r) :: "memory");
}
"""


@dataclass(frozen=True)
class GemmConfig:
    """Tunable constants of ``make_wgmma_gemm``.

    tile_m: rows of C per CTA (64, 128 or 256); split over ``consumers`` warpgroups, each
        owning 64 or 128 rows (1 or 2 ``m64`` wgmma sub-tiles).
    tile_n: columns of C per CTA = the wgmma N (multiple of 8, at most 256; 64/128/192/256
        are the useful ones). Accumulator registers per consumer thread:
        ``(tile_m / consumers / 64) * tile_n / 2`` -- keep it <= 128.
    tile_k: K per pipeline stage (64 or 128: one or two 128-byte swizzled TMA boxes).
    stages: ring depth (2..6); shared memory is ``stages * (tile_m + tile_n) * tile_k * 2`` B.
    consumers: consumer warpgroups (1 or 2).
    warp_specialized: add a producer warpgroup that only issues TMA.
    cluster: thread-block cluster size for TMA multicast; only 1 is implemented (TODO).
    split: K splits (split-K, for few output tiles over a long K). ``split`` CTAs of one thread
        block cluster share an output tile, each running ``K / split``; the others' fp32
        accumulators are summed into the first CTA's registers through distributed shared
        memory (the ring's arena, after the main loop), which alone runs the epilogue. No
        workspace, one kernel.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    consumers: int = 2
    warp_specialized: bool = True
    cluster: int = 1
    split: int = 1

    def label(self) -> str:
        """The short name :func:`parse_config` reads (``128x192x64s4c2ws``, ``64x128x64s4c1wsk4``)."""
        return (f"{self.tile_m}x{self.tile_n}x{self.tile_k}s{self.stages}c{self.consumers}"
                f"{'ws' if self.warp_specialized else 'nows'}{f'k{self.split}' if self.split > 1 else ''}")

    @property
    def name(self) -> str:
        ws = "ws" if self.warp_specialized else "nows"
        return (f"{self.tile_m}x{self.tile_n}x{self.tile_k}_s{self.stages}_c{self.consumers}"
                f"_{ws}_cl{self.cluster}{f'_k{self.split}' if self.split > 1 else ''}")

    def smem_bytes(self) -> int:
        return self.stages * (self.tile_m + self.tile_n) * self.tile_k * 2

    def threads(self) -> int:
        return 128 * (self.consumers + (1 if self.warp_specialized else 0))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GemmKey:
    """What one kernel computes: ``m`` rows of ``k`` -> ``n`` columns, then ``epilogue``; ``rows``:
    the rows are a decode batch (buffers ``(m, 1, k)``), else a prefill chunk (``(1, m, k)``)."""

    m: int
    n: int
    k: int
    epilogue: str
    dtype: str = "float16"
    rows: bool = False

    def name(self) -> str:
        return f"{'b' if self.rows else 'm'}{self.m}_n{self.n}_k{self.k}_{self.epilogue}"

    def shape_in(self) -> tuple[int, int, int]:
        return (self.m, 1, self.k) if self.rows else (1, self.m, self.k)

    def shape_out(self) -> tuple[int, int, int]:
        return (self.m, 1, self.n) if self.rows else (1, self.m, self.n)


def parse_config(text: str) -> GemmConfig:
    """``GemmConfig`` of a name like ``128x192x64s4c2ws`` (the search's :data:`tuning.wgmma_tune.CANDIDATES`)."""
    import re  # pylint: disable=import-outside-toplevel

    mt = re.match(r"^(\d+)x(\d+)x(\d+)s(\d+)c(\d+)(ws|nows)(?:k(\d+))?$", text.strip())
    if not mt:
        raise ValueError(f"bad wgmma GEMM config {text!r}: expected e.g. 128x192x64s4c2ws or 64x128x64s4c1wsk4")
    tm, tn, tk, st, cons, ws, split = mt.groups()
    return GemmConfig(int(tm), int(tn), int(tk), int(st), int(cons), ws == "ws", split=int(split or 1))


def config_problem(key: GemmKey, cfg: GemmConfig) -> str | None:
    """Why ``cfg`` cannot make ``key``'s kernel (None: it can)."""
    if key.dtype != "float16":
        return f"dtype {key.dtype} (float16 only)"
    if key.epilogue not in EPILOGUES:
        return f"epilogue {key.epilogue!r}"
    try:
        check_config(key.m, key.n, key.k, cfg)
    except ValueError as err:
        return str(err)
    return None


def make_gemm(key: GemmKey, cfg: GemmConfig, *, name: str = "wgmma_gemm",
              prefetch_w: bool = False) -> tvm.tirx.PrimFunc:
    """The model's kernel for ``key``: buffers ``(1, m, k)`` / ``(1, m, n)`` (a prefill chunk); ``prefetch_w``:
    W's tiles to L2 before the PDL wait (builds with programmatic dependent launch)."""
    problem = config_problem(key, cfg)
    if problem is not None:
        raise ValueError(f"wgmma GEMM {key.name()}: {problem}")
    return _gemm_func(key, cfg, bool(prefetch_w)).with_attr("global_symbol", name)


@functools.lru_cache(maxsize=512)
def _gemm_func(key: GemmKey, cfg: GemmConfig, prefetch_w: bool) -> tvm.tirx.PrimFunc:
    """One kernel per (key, configuration, prefetch) and process: a gpt2 export asks for the same dozen
    kernels at every layer of every entry point (288 calls), and parsing the TVMScript is what costs."""
    return make_wgmma_gemm(key.m, key.n, key.k, epilogue=key.epilogue, batch_dim=not key.rows, rows=key.rows,
                           tile_m=cfg.tile_m, tile_n=cfg.tile_n, tile_k=cfg.tile_k, stages=cfg.stages,
                           consumers=cfg.consumers, warp_specialized=cfg.warp_specialized, cluster=cfg.cluster,
                           split=cfg.split, prefetch_w=prefetch_w)


def check_config(m: int, n: int, k: int, cfg: GemmConfig) -> None:
    """Raise ``ValueError`` when ``cfg`` cannot run the ``m x n x k`` GEMM."""
    wg_m = cfg.tile_m // max(cfg.consumers, 1)
    problems = []
    if cfg.consumers not in (1, 2):
        problems.append("consumers must be 1 or 2")
    if cfg.tile_m % cfg.consumers or wg_m not in (64, 128):
        problems.append("tile_m / consumers must be 64 or 128")
    if cfg.tile_n % 8 or not 8 <= cfg.tile_n <= 256:
        problems.append("tile_n must be a multiple of 8 in [8, 256]")
    if cfg.tile_k not in (64, 128):
        problems.append("tile_k must be 64 or 128")
    if not 2 <= cfg.stages <= 8:
        problems.append("stages must be in [2, 8]")
    if cfg.cluster != 1:
        problems.append("cluster > 1 (TMA multicast) is not implemented")
    if n % cfg.tile_n or k % cfg.tile_k:
        problems.append(f"{m}x{n}x{k}: n and k are not multiples of the tile "
                        f"{cfg.tile_m}x{cfg.tile_n}x{cfg.tile_k}")
    if cfg.split not in (1, 2, 4, 8):
        problems.append("split must be 1, 2, 4 or 8 (CTAs of a portable cluster)")
    elif cfg.split > 1:
        if k % (cfg.tile_k * cfg.split):
            problems.append(f"k = {k} does not split into {cfg.split} parts of whole {cfg.tile_k}-tiles")
        if cfg.warp_specialized and cfg.consumers == 2:
            problems.append("split-K with a register-split producer (ws, 2 consumers) is not supported")
        if cfg.tile_m * cfg.tile_n * 4 > cfg.smem_bytes():
            problems.append("the fp32 tile for the split-K sum does not fit the ring's shared memory")
    if (wg_m // 64) * cfg.tile_n // 2 > 192:
        problems.append("more than 192 accumulator registers per thread")
    if cfg.smem_bytes() > 227 * 1024:
        problems.append(f"{cfg.smem_bytes()} B of shared memory > 227 KiB")
    if problems:
        raise ValueError(f"{cfg.name} for {m}x{n}x{k}: " + "; ".join(problems))


def make_wgmma_gemm(m: int, n: int, k: int, *, bias: bool = True, tile_m: int = 128,
                    tile_n: int = 128, tile_k: int = 64, stages: int = 4, consumers: int = 2,
                    warp_specialized: bool = True, cluster: int = 1, epilogue: str | None = None,
                    batch_dim: bool = False, split: int = 1, rows: bool = False,
                    prefetch_w: bool = False) -> tvm.tirx.PrimFunc:
    """The TIRx ``PrimFunc`` ``main(A, W[, bias][, R], C)`` computing ``C = epilogue(A @ W^T)``.

    ``A[m, k]``, ``W[n, k]``, ``bias[n]``, ``R[m, n]``, ``C[m, n]``, all float16 (fp32
    accumulation); ``epilogue`` one of :data:`EPILOGUES` (default ``bias`` if ``bias`` else
    ``none``); ``batch_dim``: A, R and C carry a leading dimension of 1 (``rows``: a middle one). The function has a host
    part (TMA descriptor encoding) and a device part, so it can sit in an ``IRModule`` next to
    other kernels; build it with :func:`gpt2_model.wgmma_build.build` (``tir_pipeline="tirx"``,
    target sm_90a) or in a model with :func:`gpt2_model.wgmma_build.register_mixed_pipeline`.
    Tile constants: see ``GemmConfig``. ``prefetch_w``: thread 0 sends W's K tiles to L2 (TMA prefetch)
    before the PDL wait (:data:`PDL_SYNC`), for builds with programmatic dependent launch, where that
    overlaps the previous kernel (off: the kernel is as searched).
    """
    epilogue = epilogue or ("bias" if bias else "none")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    cfg = GemmConfig(tile_m, tile_n, tile_k, stages, consumers, warp_specialized, cluster, split)
    check_config(m, n, k, cfg)
    # "tirx.is_scheduled" keeps relax's default CUDA pipeline (dlight) from rescheduling it;
    # KERNEL_ATTR routes it through the tirx lowering in MIXED_PIPELINE.
    func = _make(m, n, k, epilogue, cfg, "rows" if rows else "chunk" if batch_dim else "flat", prefetch_w)
    return func.with_attrs({"tirx.is_scheduled": True, KERNEL_ATTR: cfg.name})


def _make(M, N, K, epi: str, cfg: GemmConfig, layout: str,  # noqa: C901 - one kernel, straight-line
          prefetch_w: bool = False):
    has_bias = epi != "none"
    BM, BN, BK, S, NC = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages, cfg.consumers
    WS = cfg.warp_specialized
    KB = BK // 64                     # 128-byte K blocks (TMA boxes) per stage and operand
    WG_M = BM // NC                   # rows per consumer warpgroup
    MSUB = WG_M // 64                 # m64 wgmma sub-tiles per consumer warpgroup
    NACC = BN // 2                    # fp32 accumulators per thread per m64 sub-tile
    MT, NT, KT = -(-M // BM), N // BN, K // BK  # the last row tile may be partial (rows >= M: not stored)
    ROW_GUARD = M % BM != 0
    A_STAGE = BM * BK                 # elements of A per stage
    B_STAGE = BN * BK
    B_BASE = S * A_STAGE              # element offset of the W ring in the arena
    TX_BYTES = (BM + BN) * BK * 2
    THREADS = cfg.threads()
    PRODUCER_WG = NC                  # warpgroup index of the producer (WS only)
    REG_SPLIT = WS and NC == 2        # setmaxnreg 40 / 232 (3 warpgroups, 1 CTA per SM)
    MMA = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.f16.f16"
    SPLIT = cfg.split                 # CTAs of a cluster sharing one output tile (split-K)
    KT_S = KT // SPLIT                # K tiles per CTA
    CT = NC * 128                     # consumer threads (tid < CT)

    # ------------------------------------------------------------------ trace-time helpers
    # Plain Python functions called from the TVMScript body: their loops run in Python, so the
    # accumulator indices are constants and every emitted statement is straight-line.

    def fence_acc(acc):
        for i in range(MSUB * NACC):
            T.evaluate(T.cuda.func_call("tvm_wgmma_fence_f32", acc[i], source_code=_FENCE_SRC))

    def produce(kt, k0, m_blk, n_blk, a_map, b_map, arena, full, empty):
        """Wait for ring slot ``kt % S`` to be free, then TMA-load K tile ``k0 + kt`` into it."""
        slot = kt % S
        T.evaluate(T.cuda.mbarrier_wait(empty.ptr_to([slot]), ((kt // S) & 1) ^ 1))
        T.evaluate(T.ptx.mbarrier.arrive.expect_tx.shared.b64(full.ptr_to([slot]),
                                                              T.uint32(TX_BYTES)))
        for kb in range(KB):
            T.evaluate(T.ptx[_TMA_LOAD_2D](
                arena.ptr_to([slot * A_STAGE + kb * BM * 64]), T.address_of(a_map),
                (k0 + kt) * BK + kb * 64, m_blk * BM, full.ptr_to([slot])))
            T.evaluate(T.ptx[_TMA_LOAD_2D](
                arena.ptr_to([B_BASE + slot * B_STAGE + kb * BN * 64]), T.address_of(b_map),
                (k0 + kt) * BK + kb * 64, n_blk * BN, full.ptr_to([slot])))

    def mma_tile(kt, wg, acc, desc_a, desc_b):
        """All wgmmas of K tile ``kt`` for consumer warpgroup ``wg`` (one commit group)."""
        slot = kt % S
        T.evaluate(T.ptx.wgmma.fence.sync.aligned())
        for kk in range(BK // 16):
            kb, kq = divmod(kk, 4)
            b_off = (slot * B_STAGE + kb * BN * 64) * 2 + kq * 32          # bytes
            db = desc_b + T.Cast("uint64", b_off // 16)
            for ms in range(MSUB):
                a_off = (slot * A_STAGE + kb * BM * 64 + (wg * WG_M + ms * 64) * 64) * 2 + kq * 32
                da = desc_a + T.Cast("uint64", a_off // 16)
                T.evaluate(T.ptx[MMA](*[acc[ms * NACC + i] for i in range(NACC)], da, db,
                                      T.bool(True), 1, 1, 0, 0))
        T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())

    def finish(v, col, row, Bias, Res):
        if has_bias:
            v = v + T.Cast("float32", Bias[col])
        if epi == "bias_gelu":  # 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
            v = T.float32(0.5) * v * (T.float32(1.0) + T.tanh(
                T.float32(_GELU_C) * (v + T.float32(0.044715) * v * v * v)))
        if epi == "bias_residual":
            v = v + T.Cast("float32", Res[row, col])
        return v

    def epilogue(acc, packed, m_blk, n_blk, wg, warp, lane, C32, Bias, Res):
        for ms in range(MSUB):
            row = m_blk * BM + wg * WG_M + ms * 64 + warp * 16 + lane // 4
            for h in range(2):
                if ROW_GUARD:  # rows of the last tile past M: TMA read zeros for them; nothing is stored
                    with T.If(row + 8 * h < M):
                        with T.Then():
                            store_row(acc, packed, ms, h, row + 8 * h, n_blk, lane, C32, Bias, Res)
                else:
                    store_row(acc, packed, ms, h, row + 8 * h, n_blk, lane, C32, Bias, Res)

    def store_row(acc, packed, ms, h, r, n_blk, lane, C32, Bias, Res):
        for j in range(BN // 8):
            col = n_blk * BN + j * 8 + (lane % 4) * 2
            v0 = finish(acc[ms * NACC + j * 4 + 2 * h], col, r, Bias, Res)
            v1 = finish(acc[ms * NACC + j * 4 + 2 * h + 1], col + 1, r, Bias, Res)
            # cvt.rn.f16x2.f32 d, a, b puts a in the upper half: (hi, lo) = (v1, v0).
            T.evaluate(T.ptx[_CVT_F16X2](packed[0], v1, v0))
            T.buffer_store(C32, packed[0], [r, col // 2])

    # ------------------------------------------------------------------ the kernel (TVMScript)
    @T.inline
    def split_sum(acc, scratch, z, tid):
        # Split-K: CTAs 1..SPLIT-1 of the cluster park their fp32 accumulators in their own shared
        # memory (thread-major: element i of consumer thread t at i * CT + t); after a cluster
        # barrier CTA 0's threads add the others' values at their own indices (distributed shared
        # memory) into their registers; a second barrier keeps the others resident until then.
        T.cuda.cta_sync()  # every wgmma of this CTA has read the ring
        if tid < CT:
            if z > 0:
                for i in T.unroll(MSUB * NACC):
                    scratch[i * CT + tid] = acc[i]
        T.cuda.cluster_sync()
        if tid < CT:
            if z == 0:
                for r in T.unroll(1, SPLIT):
                    for i in T.unroll(MSUB * NACC):
                        acc[i] = acc[i] + T.cuda.func_call("tvm_dsmem_ld_f32", scratch.ptr_to([i * CT + tid]),
                                                           T.uint32(r), source_code=DSMEM_LD_SRC,
                                                           return_type="float32")
        T.cuda.cluster_sync()

    @T.inline
    def consume(wg, warp, lane, tid, k0, m_blk, n_blk, A_map, W_map, arena, full, empty,
                acc, packed, desc_a, desc_b, C32, Bias, Res):
        for i in T.unroll(MSUB * NACC):
            acc[i] = T.float32(0)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a[0]), arena.ptr_to([0]),
                                              1, 64, 3)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b[0]), arena.ptr_to([B_BASE]),
                                              1, 64, 3)
        fence_acc(acc)
        for kt in range(KT_S):
            T.cuda.mbarrier_wait(full.ptr_to([kt % S]), (kt // S) & 1)
            mma_tile(kt, wg, acc, desc_a[0], desc_b[0])
            T.ptx.wgmma.wait_group.sync.aligned(1)
            if kt > 0:
                if tid % 128 == 0:
                    T.ptx.mbarrier.arrive.shared.b64(empty.ptr_to([(kt - 1) % S]), T.uint32(1))
            if not WS:
                if tid == 0:
                    if kt + S - 1 < KT_S:
                        produce(kt + S - 1, k0, m_blk, n_blk, A_map, W_map, arena, full, empty)
        T.ptx.wgmma.wait_group.sync.aligned(0)
        fence_acc(acc)
        if SPLIT == 1:
            epilogue(acc, packed, m_blk, n_blk, wg, warp, lane, C32, Bias, Res)

    @T.inline
    def kernel_body(A_map, W_map, C, Bias, Res):
        if SPLIT == 1:
            bx = T.cta_id([MT * NT])
            z: T.let[T.int32] = T.int32(0)
        else:  # one cluster of SPLIT CTAs per output tile, CTA z taking K tiles [z * KT_S, (z + 1) * KT_S)
            bx = T.cluster_id([MT * NT])
            z = T.cta_id_in_cluster([SPLIT])
        tid = T.thread_id([THREADS])
        wg = tid // 128
        warp = (tid % 128) // 32
        lane = tid % 32
        m_blk = bx % MT
        n_blk = bx // MT
        arena = T.alloc_buffer((S * (A_STAGE + B_STAGE),), "float16", scope="shared.dyn",
                               align=1024)
        full = T.alloc_shared((S,), "uint64")
        empty = T.alloc_shared((S,), "uint64")
        acc = T.alloc_local((MSUB * NACC,), "float32")
        packed = T.alloc_local((1,), "uint32")
        desc_a = T.alloc_local((1,), "uint64")
        desc_b = T.alloc_local((1,), "uint64")
        C32 = T.decl_buffer((M, N // 2), "uint32", data=C.data)

        if tid == 0:
            for i in range(S):
                T.ptx.mbarrier.init.shared.b64(full.ptr_to([i]), T.uint32(1))
                T.ptx.mbarrier.init.shared.b64(empty.ptr_to([i]), T.uint32(NC))
            T.ptx.fence.mbarrier_init.release.cluster()
        T.ptx.fence.proxy.async_.shared__cta()
        T.cuda.cta_sync()
        # W never depends on the previous kernel: with prefetch_w its K tiles (spread over the M tiles that
        # share them) go to L2 before the PDL wait (PDL_SYNC: a no-op without PDL), while the previous grid runs
        if prefetch_w and tid == 0:
            for kt in range(KT_S):
                if kt % MT == m_blk:
                    for kb in range(KB):
                        T.evaluate(T.cuda.func_call(
                            "gpt2k_tma_prefetch_2d", T.address_of(W_map), (z * KT_S + kt) * BK + kb * 64,
                            n_blk * BN, source_code=_TMA_PREFETCH_SRC))
        T.evaluate(T.cuda.func_call(PDL_SYNC, source_code=PDL_SYNC_SRC))

        if WS:
            if wg == PRODUCER_WG:
                if REG_SPLIT:
                    T.ptx["setmaxnreg.dec.sync.aligned.u32"](40)
                if tid % 128 == 0:
                    for kt in range(KT_S):
                        produce(kt, z * KT_S, m_blk, n_blk, A_map, W_map, arena, full, empty)
            else:
                if REG_SPLIT:
                    T.ptx["setmaxnreg.inc.sync.aligned.u32"](232)
                consume(wg, warp, lane, tid, z * KT_S, m_blk, n_blk, A_map, W_map, arena, full, empty,
                        acc, packed, desc_a, desc_b, C32, Bias, Res)
        else:
            if tid == 0:
                for kt in range(min(S - 1, KT_S)):
                    produce(kt, z * KT_S, m_blk, n_blk, A_map, W_map, arena, full, empty)
            consume(wg, warp, lane, tid, z * KT_S, m_blk, n_blk, A_map, W_map, arena, full, empty,
                    acc, packed, desc_a, desc_b, C32, Bias, Res)
        if SPLIT > 1:
            scratch = T.decl_buffer((BM * BN,), "float32", data=arena.data, scope="shared.dyn")
            split_sum(acc, scratch, z, tid)
            if tid < CT:
                if z == 0:
                    epilogue(acc, packed, m_blk, n_blk, wg, warp, lane, C32, Bias, Res)

    a_box = (64, BM)
    b_box = (64, BN)
    a_shape = {"chunk": (1, M, K), "rows": (M, 1, K), "flat": (M, K)}[layout]
    c_shape = {"chunk": (1, M, N), "rows": (M, 1, N), "flat": (M, N)}[layout]

    @T.inline
    def encode_maps(A, W, A_map, W_map):
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "float16", 2, A.data,
                      K, M, K * 2, a_box[0], a_box[1], 1, 1, 0, 3, 2, 0)
        T.call_packed("runtime.cuTensorMapEncodeTiled", W_map, "float16", 2, W.data,
                      K, N, K * 2, b_box[0], b_box[1], 1, 1, 0, 3, 2, 0)

    if epi == "bias_residual":
        @T.prim_func
        def main(A_ptr: T.handle, W_ptr: T.handle, bias_ptr: T.handle, r_ptr: T.handle, C_ptr: T.handle):
            A = T.match_buffer(A_ptr, a_shape, "float16", align=16)
            W = T.match_buffer(W_ptr, (N, K), "float16", align=16)
            Bias = T.match_buffer(bias_ptr, (N,), "float16", align=16)
            R = T.match_buffer(r_ptr, c_shape, "float16", align=16)
            C = T.match_buffer(C_ptr, c_shape, "float16", align=16)
            R2 = T.decl_buffer((M, N), "float16", data=R.data)
            A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            W_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            encode_maps(A, W, A_map, W_map)
            T.device_entry()
            kernel_body(A_map, W_map, C, Bias, R2)
    elif has_bias:
        @T.prim_func
        def main(A_ptr: T.handle, W_ptr: T.handle, bias_ptr: T.handle, C_ptr: T.handle):
            A = T.match_buffer(A_ptr, a_shape, "float16", align=16)
            W = T.match_buffer(W_ptr, (N, K), "float16", align=16)
            Bias = T.match_buffer(bias_ptr, (N,), "float16", align=16)
            C = T.match_buffer(C_ptr, c_shape, "float16", align=16)
            A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            W_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            encode_maps(A, W, A_map, W_map)
            T.device_entry()
            kernel_body(A_map, W_map, C, Bias, None)
    else:
        @T.prim_func
        def main(A_ptr: T.handle, W_ptr: T.handle, C_ptr: T.handle):
            A = T.match_buffer(A_ptr, a_shape, "float16", align=16)
            W = T.match_buffer(W_ptr, (N, K), "float16", align=16)
            C = T.match_buffer(C_ptr, c_shape, "float16", align=16)
            A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            W_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            encode_maps(A, W, A_map, W_map)
            T.device_entry()
            kernel_body(A_map, W_map, C, None, None)

    return main
