"""A Hopper ``wgmma`` GEMM in TVM 0.27's TIRx CUDA dialect: ``C = A @ W^T (+ bias)``.

Shapes: ``A[M, K]`` fp16, ``W[N, K]`` fp16 (the ``nn.Linear`` layout, so both operands are
K-major, which is what ``wgmma`` reads without transposes), ``bias[N]`` fp16, ``C[M, N]`` fp16,
fp32 accumulation.

The kernel is a plain TIRx ``PrimFunc`` (``tir_pipeline="tirx"``), written with the low-level
parts of ``tvm.backend.cuda`` -- ``T.ptx[...]`` PTX instructions, ``T.cuda.*`` helpers -- because
TVM 0.27's tile-level ``gemm_async`` only dispatches to Blackwell ``tcgen05`` (no Hopper
``wgmma`` dispatch exists). Structure (one output tile per CTA, no persistence):

* host prologue: two ``cuTensorMapEncodeTiled`` descriptors (A and W; 2-D, 128-byte swizzle,
  box ``64 x tile_rows``), passed to the kernel as ``__grid_constant__ CUtensorMap``;
* shared memory: one dynamic arena holding ``stages`` ring slots of ``A[tile_k/64][tile_m][64]``
  and ``W[tile_k/64][tile_n][64]`` (each 64-element K block is one 128-byte swizzled TMA box),
  plus static ``full[stages]`` / ``empty[stages]`` mbarriers;
* producer: one thread issues ``cp.async.bulk.tensor.2d`` (TMA) loads into a slot after waiting
  on its ``empty`` barrier and arms its ``full`` barrier with ``mbarrier.arrive.expect_tx``.
  With ``warp_specialized=True`` it lives in an extra producer warpgroup (``setmaxnreg`` moves
  registers to the consumers when there are two consumer warpgroups); otherwise thread 0 of
  consumer warpgroup 0 issues the loads ``stages - 1`` tiles ahead between its MMAs;
* consumers: ``consumers`` warpgroups, each owning ``tile_m / consumers`` rows (1 or 2
  ``m64`` sub-tiles), issue ``wgmma.mma_async.sync.aligned.m64n{tile_n}k16.f32.f16.f16``
  with shared-memory descriptors (SW128 K-major: LBO 1, SBO 1024 B, +32 B per k16 step),
  keep one wgmma group in flight (``wait_group 1``) and release the previous slot;
* epilogue: registers -> (+ bias in fp32) -> ``cvt.rn.f16x2.f32`` -> 4-byte global stores.

Gotchas found on 0.27.0.post1 (handled here):

* ``wgmma``/``setmaxnreg`` are registered with ``cert_arch="sm_90a"``: build with the target
  ``{"kind": "cuda", "arch": "sm_90a"}`` (plain ``sm_90`` fails in ptxas: wgmma needs sm_90a).
* ``T.cuda.wgmma.noop_barrier`` is broken (its codegen reads ``.dtype`` off a ``TensorLoad`` and
  the emitted helper takes the register by value with an empty body), so this module uses its
  own ``asm volatile("" : "+f"(r) :: "memory")`` operand fence through ``T.cuda.func_call``.
* The ``scale_d`` operand of ``wgmma`` is a ``.pred``: pass a bool expression.
* One ``tvm.compile`` uses one TIR pipeline, and neither ``"tirx"`` nor the default s_tir one
  accepts the other kind of PrimFunc: a relax module holding these kernels next to
  dlight-scheduled ones needs ``tir_pipeline=register_mixed_pipeline()`` (and the kernels carry
  ``tirx.is_scheduled`` so dlight leaves them alone).
* Without a CUDA runtime (this CPU build machine) ``tvm.compile`` keeps the CUDA source in the
  module (compiled when loaded on a GPU); ``compile_cubin`` runs nvcc for sm_90a to check it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import tvm
from tvm.script import tirx as T

#: The target every kernel here is built for (wgmma needs the "a" variant of sm_90).
SM90A = {"kind": "cuda", "arch": "sm_90a"}
#: PrimFunc attribute marking a kernel from this module (value: the config name).
KERNEL_ATTR = "tuning.wgmma_config"
#: ``tir_pipeline`` name for relax modules that mix these tirx kernels with ordinary s_tir
#: kernels (``register_mixed_pipeline``).
MIXED_PIPELINE = "wgmma_mixed"

_TMA_LOAD_2D = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
_CVT_F16X2 = "cvt.rn.f16x2.f32"

# Register-operand fence (CUTLASS's ``warpgroup_fence_operand``): keeps nvcc from moving reads
# or writes of an accumulator register across the asynchronous wgmma that owns it.
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
    cluster: thread-block cluster size; only 1 is implemented (2 = TMA multicast, TODO).
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    consumers: int = 2
    warp_specialized: bool = True
    cluster: int = 1

    @property
    def name(self) -> str:
        ws = "ws" if self.warp_specialized else "nows"
        return (f"{self.tile_m}x{self.tile_n}x{self.tile_k}_s{self.stages}_c{self.consumers}"
                f"_{ws}_cl{self.cluster}")

    def smem_bytes(self) -> int:
        return self.stages * (self.tile_m + self.tile_n) * self.tile_k * 2

    def threads(self) -> int:
        return 128 * (self.consumers + (1 if self.warp_specialized else 0))

    def as_dict(self) -> dict:
        return asdict(self)


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
    if m % cfg.tile_m or n % cfg.tile_n or k % cfg.tile_k:
        problems.append(f"{m}x{n}x{k} is not a multiple of the tile "
                        f"{cfg.tile_m}x{cfg.tile_n}x{cfg.tile_k}")
    if (wg_m // 64) * cfg.tile_n // 2 > 192:
        problems.append("more than 192 accumulator registers per thread")
    if cfg.smem_bytes() > 227 * 1024:
        problems.append(f"{cfg.smem_bytes()} B of shared memory > 227 KiB")
    if problems:
        raise ValueError(f"{cfg.name} for {m}x{n}x{k}: " + "; ".join(problems))


def make_wgmma_gemm(m: int, n: int, k: int, *, bias: bool = True, tile_m: int = 128,
                    tile_n: int = 128, tile_k: int = 64, stages: int = 4, consumers: int = 2,
                    warp_specialized: bool = True, cluster: int = 1) -> tvm.tirx.PrimFunc:
    """The TIRx ``PrimFunc`` ``main(A, W[, bias], C)`` computing ``C = A @ W^T (+ bias)``.

    ``A[m, k]``, ``W[n, k]``, ``bias[n]``, ``C[m, n]``, all float16 (fp32 accumulation). The
    function has a host part (TMA descriptor encoding) and a device part, so it can sit in an
    ``IRModule`` next to other kernels; build it with ``build`` (``tir_pipeline="tirx"``,
    target sm_90a). Tile constants: see ``GemmConfig``.
    """
    cfg = GemmConfig(tile_m, tile_n, tile_k, stages, consumers, warp_specialized, cluster)
    check_config(m, n, k, cfg)
    # "tirx.is_scheduled" keeps relax's default CUDA pipeline (dlight) from rescheduling it;
    # KERNEL_ATTR routes it through the tirx lowering in MIXED_PIPELINE.
    func = _make(m, n, k, bias, cfg)
    return func.with_attrs({"tirx.is_scheduled": True, KERNEL_ATTR: cfg.name})


def _make(M, N, K, has_bias, cfg: GemmConfig):  # noqa: C901 - one kernel, straight-line
    BM, BN, BK, S, NC = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages, cfg.consumers
    WS = cfg.warp_specialized
    KB = BK // 64                     # 128-byte K blocks (TMA boxes) per stage and operand
    WG_M = BM // NC                   # rows per consumer warpgroup
    MSUB = WG_M // 64                 # m64 wgmma sub-tiles per consumer warpgroup
    NACC = BN // 2                    # fp32 accumulators per thread per m64 sub-tile
    MT, NT, KT = M // BM, N // BN, K // BK
    A_STAGE = BM * BK                 # elements of A per stage
    B_STAGE = BN * BK
    B_BASE = S * A_STAGE              # element offset of the W ring in the arena
    TX_BYTES = (BM + BN) * BK * 2
    THREADS = cfg.threads()
    PRODUCER_WG = NC                  # warpgroup index of the producer (WS only)
    REG_SPLIT = WS and NC == 2        # setmaxnreg 40 / 232 (3 warpgroups, 1 CTA per SM)
    MMA = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.f16.f16"

    # ------------------------------------------------------------------ trace-time helpers
    # Plain Python functions called from the TVMScript body: their loops run in Python, so the
    # accumulator indices are constants and every emitted statement is straight-line.

    def fence_acc(acc):
        for i in range(MSUB * NACC):
            T.evaluate(T.cuda.func_call("tvm_wgmma_fence_f32", acc[i], source_code=_FENCE_SRC))

    def produce(kt, m_blk, n_blk, a_map, b_map, arena, full, empty):
        """Wait for ring slot ``kt % S`` to be free, then TMA-load K tile ``kt`` into it."""
        slot = kt % S
        T.evaluate(T.cuda.mbarrier_wait(empty.ptr_to([slot]), ((kt // S) & 1) ^ 1))
        T.evaluate(T.ptx.mbarrier.arrive.expect_tx.shared.b64(full.ptr_to([slot]),
                                                              T.uint32(TX_BYTES)))
        for kb in range(KB):
            T.evaluate(T.ptx[_TMA_LOAD_2D](
                arena.ptr_to([slot * A_STAGE + kb * BM * 64]), T.address_of(a_map),
                kt * BK + kb * 64, m_blk * BM, full.ptr_to([slot])))
            T.evaluate(T.ptx[_TMA_LOAD_2D](
                arena.ptr_to([B_BASE + slot * B_STAGE + kb * BN * 64]), T.address_of(b_map),
                kt * BK + kb * 64, n_blk * BN, full.ptr_to([slot])))

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

    def epilogue(acc, packed, m_blk, n_blk, wg, warp, lane, C32, Bias):
        for ms in range(MSUB):
            row = m_blk * BM + wg * WG_M + ms * 64 + warp * 16 + lane // 4
            for j in range(BN // 8):
                col = n_blk * BN + j * 8 + (lane % 4) * 2
                for h in range(2):
                    v0 = acc[ms * NACC + j * 4 + 2 * h]
                    v1 = acc[ms * NACC + j * 4 + 2 * h + 1]
                    if has_bias:
                        v0 = v0 + T.Cast("float32", Bias[col])
                        v1 = v1 + T.Cast("float32", Bias[col + 1])
                    # cvt.rn.f16x2.f32 d, a, b puts a in the upper half: (hi, lo) = (v1, v0).
                    T.evaluate(T.ptx[_CVT_F16X2](packed[0], v1, v0))
                    T.buffer_store(C32, packed[0], [row + 8 * h, col // 2])

    # ------------------------------------------------------------------ the kernel (TVMScript)
    @T.inline
    def consume(wg, warp, lane, tid, m_blk, n_blk, A_map, W_map, arena, full, empty,
                acc, packed, desc_a, desc_b, C32, Bias):
        for i in T.unroll(MSUB * NACC):
            acc[i] = T.float32(0)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a[0]), arena.ptr_to([0]),
                                              1, 64, 3)
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b[0]), arena.ptr_to([B_BASE]),
                                              1, 64, 3)
        fence_acc(acc)
        for kt in range(KT):
            T.cuda.mbarrier_wait(full.ptr_to([kt % S]), (kt // S) & 1)
            mma_tile(kt, wg, acc, desc_a[0], desc_b[0])
            T.ptx.wgmma.wait_group.sync.aligned(1)
            if kt > 0:
                if tid % 128 == 0:
                    T.ptx.mbarrier.arrive.shared.b64(empty.ptr_to([(kt - 1) % S]), T.uint32(1))
            if not WS:
                if tid == 0:
                    if kt + S - 1 < KT:
                        produce(kt + S - 1, m_blk, n_blk, A_map, W_map, arena, full, empty)
        T.ptx.wgmma.wait_group.sync.aligned(0)
        fence_acc(acc)
        epilogue(acc, packed, m_blk, n_blk, wg, warp, lane, C32, Bias)

    @T.inline
    def kernel_body(A_map, W_map, C, Bias):
        bx = T.cta_id([MT * NT])
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

        if WS:
            if wg == PRODUCER_WG:
                if REG_SPLIT:
                    T.ptx["setmaxnreg.dec.sync.aligned.u32"](40)
                if tid % 128 == 0:
                    for kt in range(KT):
                        produce(kt, m_blk, n_blk, A_map, W_map, arena, full, empty)
            else:
                if REG_SPLIT:
                    T.ptx["setmaxnreg.inc.sync.aligned.u32"](232)
                consume(wg, warp, lane, tid, m_blk, n_blk, A_map, W_map, arena, full, empty,
                        acc, packed, desc_a, desc_b, C32, Bias)
        else:
            if tid == 0:
                for kt in range(min(S - 1, KT)):
                    produce(kt, m_blk, n_blk, A_map, W_map, arena, full, empty)
            consume(wg, warp, lane, tid, m_blk, n_blk, A_map, W_map, arena, full, empty,
                    acc, packed, desc_a, desc_b, C32, Bias)

    a_box = (64, BM)
    b_box = (64, BN)

    if has_bias:
        @T.prim_func
        def main(A_ptr: T.handle, W_ptr: T.handle, bias_ptr: T.handle, C_ptr: T.handle):
            A = T.match_buffer(A_ptr, (M, K), "float16", align=16)
            W = T.match_buffer(W_ptr, (N, K), "float16", align=16)
            Bias = T.match_buffer(bias_ptr, (N,), "float16", align=16)
            C = T.match_buffer(C_ptr, (M, N), "float16", align=16)
            A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "float16", 2, A.data,
                          K, M, K * 2, a_box[0], a_box[1], 1, 1, 0, 3, 2, 0)
            W_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            T.call_packed("runtime.cuTensorMapEncodeTiled", W_map, "float16", 2, W.data,
                          K, N, K * 2, b_box[0], b_box[1], 1, 1, 0, 3, 2, 0)
            T.device_entry()
            kernel_body(A_map, W_map, C, Bias)
    else:
        @T.prim_func
        def main(A_ptr: T.handle, W_ptr: T.handle, C_ptr: T.handle):
            A = T.match_buffer(A_ptr, (M, K), "float16", align=16)
            W = T.match_buffer(W_ptr, (N, K), "float16", align=16)
            C = T.match_buffer(C_ptr, (M, N), "float16", align=16)
            A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "float16", 2, A.data,
                          K, M, K * 2, a_box[0], a_box[1], 1, 1, 0, 3, 2, 0)
            W_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            T.call_packed("runtime.cuTensorMapEncodeTiled", W_map, "float16", 2, W.data,
                          K, N, K * 2, b_box[0], b_box[1], 1, 1, 0, 3, 2, 0)
            T.device_entry()
            kernel_body(A_map, W_map, C, None)

    return main


def target() -> tvm.target.Target:
    """The sm_90a CUDA target (no GPU needed to build for it)."""
    return tvm.target.Target(SM90A)


def build(func: tvm.tirx.PrimFunc, tgt: tvm.target.Target | None = None):
    """Compile one kernel from ``make_wgmma_gemm`` (CUDA C -> nvcc, sm_90a) into an Executable.

    ``exe(A, W, bias, C)`` runs it (tvm tensors or torch CUDA tensors via DLPack);
    ``exe.mod.imports[0].inspect_source()`` is the generated CUDA.
    """
    tgt = tgt or target()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    # The target scope makes tvm.support.nvcc's compile callback (called during tvm.compile on
    # a CUDA-enabled build) pick sm_90a; on a build/machine without CUDA the module keeps the
    # CUDA source and compiles it when loaded.
    with tgt:
        return tvm.compile(mod, target=tgt, tir_pipeline="tirx")


def cuda_source(exe) -> str:
    """The generated CUDA C of an Executable from ``build``."""
    return exe.mod.imports[0].inspect_source()


def compile_cubin(src: str, arch: str = "sm_90a") -> tuple[bytes, str]:
    """Compile generated CUDA source to a cubin for ``arch``; return ``(cubin, ptxas log)``.

    Uses ``nvcc -Xptxas -v`` when nvcc is on PATH (the log has registers / spills), else NVRTC
    through ``tvm.support.nvcc`` (empty log). Works without a GPU.
    """
    import os
    import shutil
    import subprocess
    import tempfile

    if shutil.which("nvcc"):
        with tempfile.TemporaryDirectory() as tmp:
            cu, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
            with open(cu, "w") as f:
                f.write(src)
            res = subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v",
                                  "-diag-suppress", "177", "-o", out, cu],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
            with open(out, "rb") as f:
                return f.read(), "\n".join(ln for ln in res.stderr.splitlines()
                                           if ln.startswith(("ptxas", "    ")))
    from tvm.support import nvcc

    return bytes(nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvrtc")), ""


def ptxas_summary(log: str) -> dict:
    """``{"registers": int, "spill_bytes": int}`` parsed from a ``ptxas -v`` log (or ``{}``)."""
    import re

    out = {}
    regs = re.search(r"Used (\d+) registers", log)
    if regs:
        out["registers"] = int(regs.group(1))
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    if spills:
        out["spill_bytes"] = sum(int(s) for s in spills)
    return out


def register_mixed_pipeline() -> str:
    """Register (once) and return ``MIXED_PIPELINE``: a TIR pipeline for mixed modules.

    TVM 0.27 picks one TIR pipeline per ``tvm.compile``: ``"tirx"`` rejects s_tir PrimFuncs
    (the dlight-scheduled kernels of a relax model) and the default s_tir pipeline rejects
    tirx PrimFuncs. This one lowers the functions carrying ``KERNEL_ATTR`` with the tirx
    pipeline and everything else with the s_tir pipeline, then merges the two modules (the
    finalization passes of both pipelines are the same). Use it as
    ``tvm.compile(relax_mod, target, tir_pipeline=register_mixed_pipeline())``.
    """
    from tvm.tirx import compilation_pipeline as cp

    if MIXED_PIPELINE in cp.PIPELINE_MAP:
        return MIXED_PIPELINE

    def factory():
        s_pipe, fin_host, fin_dev = cp.get_tir_pipeline("s_tir")
        x_pipe, _, _ = cp.get_tir_pipeline("tirx")

        @tvm.transform.module_pass(opt_level=0, name="WgmmaMixedPipeline")
        def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            ours, rest = {}, {}
            for gvar, func in mod.functions_items():
                is_ours = isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None \
                    and KERNEL_ATTR in func.attrs
                (ours if is_ours else rest)[gvar] = func
            out = s_pipe(tvm.IRModule(rest, attrs=mod.attrs)) if rest else None
            if ours:
                lowered = x_pipe(tvm.IRModule(ours, attrs=mod.attrs))
                if out is None:
                    out = lowered
                else:
                    out.update(lowered)
            return out if out is not None else mod

        return _pipeline, fin_host, fin_dev

    cp.register_tir_pipeline(MIXED_PIPELINE, factory)
    return MIXED_PIPELINE
