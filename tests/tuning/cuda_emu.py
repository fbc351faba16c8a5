"""Run a TVM-generated CUDA kernel on the CPU: a small emulation for tests on machines without a GPU.

The kernel's CUDA source (what ``tvm.compile`` emits for an ``sm_90`` target) is compiled as C++
with g++ against the header below: every CUDA thread of a block is a ``std::thread`` (blocks run
one after another, so ``__shared__`` arrays become ``static`` ones), ``__syncthreads()`` is a
``std::barrier`` of the block, ``__shfl_xor_sync`` and ``mma.sync.aligned.m16n8k16`` (f16 inputs,
f32 accumulators) exchange values through per-warp buffers between two warp barriers. The mma
emulation rebuilds the 16x16 A, 16x8 B and C tiles from the lanes' fragments with the PTX ISA's
layouts (lane ``t``: ``g = t / 4``, ``c = t % 4``; A regs: rows g / g+8, columns 2c.. / 2c+8..; B
regs: rows 2c.. / 2c+8.., column g; C: rows g / g+8, columns 2c, 2c+1) and gives each lane its
four results. ``half`` is the compiler's ``_Float16`` (IEEE binary16, NumPy's float16 layout).

For the mma.sync GEMM spaces also: ``mma.sync...m16n8k16.row.col.f16.f16.f16.f16`` (f16 accumulators,
two registers: rows g / g+8, columns 2c, 2c+1; summed in f32, rounded once), ``ldmatrix...x4``
(lanes 8i..8i+7 give the row addresses of matrix i; lane t gets row t/4, columns 2(t%4).. of each;
``.trans`` the transpose), dynamic shared memory (``extern __shared__ ... buf_dyn_shmem_ptr[]``, one
buffer per block, ``__cvta_generic_to_shared`` an offset into it) and TVM's ``cp.async`` helpers
(the copy done at once, the predicated form zero-filling; commit/wait groups are then no-ops: the
emulation checks indexing and arithmetic, not the asynchrony).

Only what the kernels under test use is emulated; an unknown construct fails to compile, it is
not silently ignored. Slow (a thread per CUDA thread): meant for a few small blocks.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

HEADER = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <cstdint>
typedef _Float16 half;
typedef unsigned int uint;
typedef unsigned char uchar;
struct uint4 { unsigned x, y, z, w; };
struct half2 { half x, y; };
struct half4 { half x, y, z, w; };
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
static inline half __float2half_rn(float x) { return (half)x; }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline unsigned __pack_half2(half x, half y) {
  unsigned short a, b; std::memcpy(&a, &x, 2); std::memcpy(&b, &y, 2); return ((unsigned)b << 16) | a;
}
static inline void gpt2k_pdl_sync() {}  // PDL's wait + trigger (gpt2_model.norm_gemv): one grid here, nothing to wait for
template <class A, class B> static inline auto max(A a, B b) { return a > b ? a : b; }
template <class A, class B> static inline auto min(A a, B b) { return a < b ? a : b; }
struct emu_dim3 { int x, y, z; };
static thread_local emu_dim3 threadIdx, blockIdx;
struct EmuBlock {
  int nwarps;
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<double> shfl;          // [warp][lane]
  std::vector<unsigned> a, b;        // [warp][lane][4] / [2]
  std::vector<float> c;              // [warp][lane][4]
  std::vector<unsigned> addr;        // [warp][lane]: ldmatrix row addresses
  std::vector<unsigned char> dyn;    // dynamic shared memory of the block
};
static EmuBlock* emu_blk = nullptr;
static inline int emu_warp() { return (threadIdx.y * 32 + threadIdx.x) / 32; }
static inline int emu_lane() { return (threadIdx.y * 32 + threadIdx.x) % 32; }
static inline void __syncthreads() { emu_blk->block->arrive_and_wait(); }
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width) {
  int w = emu_warp(), l = emu_lane();
  emu_blk->shfl[w * 32 + l] = (double)v;
  emu_blk->warp[w]->arrive_and_wait();
  T r = (T)emu_blk->shfl[w * 32 + (l ^ lane_mask)];
  emu_blk->warp[w]->arrive_and_wait();
  return r;
}
static inline float emu_h(unsigned reg, int hi) {
  unsigned short s = hi ? (unsigned short)(reg >> 16) : (unsigned short)(reg & 0xFFFF);
  half h; std::memcpy(&h, &s, 2); return (float)h;
}
// D = A (16x16, row) * B (16x8, col) + C, f16 inputs, f32 accumulate: mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
static inline void emu_mma(float& d0, float& d1, float& d2, float& d3, unsigned a0, unsigned a1, unsigned a2,
                           unsigned a3, unsigned b0, unsigned b1, float c0, float c1, float c2, float c3) {
  int w = emu_warp(), l = emu_lane();
  unsigned* A = &emu_blk->a[w * 128]; unsigned* B = &emu_blk->b[w * 64]; float* C = &emu_blk->c[w * 128];
  A[l * 4 + 0] = a0; A[l * 4 + 1] = a1; A[l * 4 + 2] = a2; A[l * 4 + 3] = a3;
  B[l * 2 + 0] = b0; B[l * 2 + 1] = b1;
  C[l * 4 + 0] = c0; C[l * 4 + 1] = c1; C[l * 4 + 2] = c2; C[l * 4 + 3] = c3;
  emu_blk->warp[w]->arrive_and_wait();
  float Am[16][16], Bm[16][8];
  for (int t = 0; t < 32; ++t) {
    int g = t / 4, c = t % 4;
    for (int i = 0; i < 8; ++i) {  // a_i: reg i/2, half i%2
      int row = g + ((i / 2) % 2) * 8, col = c * 2 + (i % 2) + (i / 4) * 8;
      Am[row][col] = emu_h(A[t * 4 + i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {  // b_i: reg i/2, half i%2
      int row = c * 2 + (i % 2) + (i / 2) * 8;
      Bm[row][g] = emu_h(B[t * 2 + i / 2], i % 2);
    }
  }
  int g = l / 4, c = l % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    int row = g + (i / 2) * 8, col = c * 2 + (i % 2);
    float acc = C[l * 4 + i];
    for (int k = 0; k < 16; ++k) acc += Am[row][k] * Bm[k][col];
    out[i] = acc;
  }
  emu_blk->warp[w]->arrive_and_wait();
  d0 = out[0]; d1 = out[1]; d2 = out[2]; d3 = out[3];
}
static inline unsigned emu_pack(float lo, float hi) { return __pack_half2((half)lo, (half)hi); }
// D = A * B + C with f16 accumulators: mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16
static inline void emu_mma_f16(unsigned& d0, unsigned& d1, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                               unsigned b0, unsigned b1, unsigned c0, unsigned c1) {
  float r0, r1, r2, r3;
  emu_mma(r0, r1, r2, r3, a0, a1, a2, a3, b0, b1, emu_h(c0, 0), emu_h(c0, 1), emu_h(c1, 0), emu_h(c1, 1));
  d0 = emu_pack(r0, r1); d1 = emu_pack(r2, r3);
}
static inline unsigned __cvta_generic_to_shared(const void* p) {
  return (unsigned)((const unsigned char*)p - emu_blk->dyn.data());
}
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8i + r gives row r of matrix i
static inline void emu_ldmatrix(bool trans, unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  int w = emu_warp(), l = emu_lane();
  emu_blk->addr[w * 32 + l] = addr;
  emu_blk->warp[w]->arrive_and_wait();
  unsigned out[4];
  for (int i = 0; i < 4; ++i) {
    half v[2];
    for (int e = 0; e < 2; ++e) {
      int row = trans ? 2 * (l % 4) + e : l / 4, col = trans ? l / 4 : 2 * (l % 4) + e;
      std::memcpy(&v[e], emu_blk->dyn.data() + emu_blk->addr[w * 32 + i * 8 + row] + 2 * col, 2);
    }
    out[i] = __pack_half2(v[0], v[1]);
  }
  emu_blk->warp[w]->arrive_and_wait();
  r0 = out[0]; r1 = out[1]; r2 = out[2]; r3 = out[3];
}
static void emu_run(int gx, int gy, int bx, int by, const std::function<void()>& kernel) {
  int n = bx * by;
  for (int y = 0; y < gy; ++y)
    for (int x = 0; x < gx; ++x) {
      EmuBlock blk;
      blk.nwarps = (n + 31) / 32;
      blk.block = std::make_unique<std::barrier<>>(n);
      for (int w = 0; w < blk.nwarps; ++w) blk.warp.push_back(std::make_unique<std::barrier<>>(32));
      blk.shfl.assign(blk.nwarps * 32, 0.0);
      blk.a.assign(blk.nwarps * 128, 0u); blk.b.assign(blk.nwarps * 64, 0u); blk.c.assign(blk.nwarps * 128, 0.f);
      blk.addr.assign(blk.nwarps * 32, 0u); blk.dyn.assign(232448, 0xFF);  // sm_90's opt-in limit, NaN-ish fill
      emu_blk = &blk;
      std::vector<std::thread> threads;
      for (int ty = 0; ty < by; ++ty)
        for (int tx = 0; tx < bx; ++tx)
          threads.emplace_back([=, &kernel] { threadIdx = {tx, ty, 0}; blockIdx = {x, y, 0}; kernel(); });
      for (auto& t : threads) t.join();
      emu_blk = nullptr;
    }
}
#define __global__
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
"""

_MMA_F32 = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
_MMA_F16 = "mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16"
_LDMATRIX = "ldmatrix.sync.aligned.m8n8.x4"


def _operands(text: str) -> list[str]:
    """The expressions of the asm operand list ``"=f"(e0), "r"(e1), ...`` (balanced parentheses)."""
    out, i = [], 0
    while True:
        m = re.compile(r'"=?[frh]"\s*\(').search(text, i)
        if not m:
            return out
        depth, j = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        out.append(text[m.end():j - 1])
        i = j


def _replace_asm(body: str) -> str:
    def repl(m: re.Match) -> str:
        asm = m.group(0)
        ops = _operands(asm)
        if _MMA_F32 in asm:
            if len(ops) != 14:  # 4 outputs, 4 A regs, 2 B regs, 4 C inputs
                raise ValueError(f"cuda_emu: unexpected mma operands ({len(ops)}): {asm[:200]}")
            return "emu_mma(" + ", ".join(ops) + ");"
        if _MMA_F16 in asm:
            if len(ops) != 10:  # 2 outputs, 4 A regs, 2 B regs, 2 C inputs
                raise ValueError(f"cuda_emu: unexpected f16 mma operands ({len(ops)}): {asm[:200]}")
            return "emu_mma_f16(" + ", ".join(ops) + ");"
        if _LDMATRIX in asm and ".shared.b16" in asm:
            if len(ops) != 5:  # 4 registers, the address
                raise ValueError(f"cuda_emu: unexpected ldmatrix operands ({len(ops)}): {asm[:200]}")
            trans = "true" if ".trans" in asm else "false"
            return f"emu_ldmatrix({trans}, {ops[4]}, " + ", ".join(ops[:4]) + ");"
        raise ValueError(f"cuda_emu: unsupported inline asm: {asm[:120]}")

    return re.sub(r"__asm__\s+__volatile__\s*\((?:.|\n)*?\);", repl, body)


def _signature(source: str, name: str | None) -> tuple[str, str, list[tuple[str, str]]]:
    pattern = r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\)\s*\{'
    found = [m for m in re.finditer(pattern, source) if name is None or m.group(1) == name]
    if len(found) != 1:
        raise ValueError(f"cuda_emu: {len(found)} kernel definitions {'named ' + name if name else ''} in the source "
                         "(name the one to run)")
    m = found[0]
    params = []
    for p in m.group(2).split(","):
        p = p.replace("__restrict__", "").strip()
        typ, pname = p.rsplit(" ", 1)
        params.append((typ.strip(), pname.strip()))
    return m.group(1), source[m.start():], params


_CP_ASYNC = re.compile(r"__device__ void (ptx_cp_async_\w+)\(([^)]*)\)\s*\{(.*?)\n\}", re.S)
_ASYNC_GROUPS = re.compile(r"__device__ void (tvm_builtin_ptx_cp_async_(?:wait|commit)_group\w*)\(\)")


def _async_helpers(source: str) -> str:
    """C++ stand-ins for the ``cp.async`` helpers TVM defines before its kernels: the copy at
    once (zero-fill when a predicated one is off), commit/wait groups as no-ops."""
    out = []
    for m in _CP_ASYNC.finditer(source):
        fname, params, body = m.groups()
        dst = re.search(r"dst_off \* (\d+)", body)
        src = re.search(r"src_off \* (\d+)", body)
        nbytes = re.search(r'"n"\((\d+)\)', body)
        if not (dst and src and nbytes) or "cp.async" not in body:
            raise ValueError(f"cuda_emu: unexpected cp.async helper {fname}: {body[:200]}")
        pred = "predicate" in params
        copy = (f"std::memcpy((char*)dst + dst_off * {dst.group(1)}, (const char*)src + src_off * {src.group(1)}, "
                f"{nbytes.group(1)});")
        if pred:
            copy = (f"if (predicate == 1) {{ {copy} }} else "
                    f"std::memset((char*)dst + dst_off * {dst.group(1)}, 0, {nbytes.group(1)});")
        out.append(f"static inline void {fname}({params}) {{ {copy} }}")
    out += [f"static inline void {m.group(1)}() {{}}" for m in _ASYNC_GROUPS.finditer(source)]
    return "\n".join(out) + "\n"


def emulate(source: str, work_dir: Path, name: str | None = None):
    """Compile kernel ``name`` (default: the only one) of a TVM CUDA ``source`` for the CPU; returns
    ``launch(grid, block, *args)`` (grid and block as (x, y); pointer arguments as NumPy arrays,
    written in place; ``launch.params``: the kernel's (type, name) parameters in order)."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    gxx = shutil.which("g++")
    if gxx is None:
        raise RuntimeError("cuda_emu needs g++")
    name, kernel, params = _signature(source, name)
    kernel = _replace_asm(kernel).replace('extern "C" ', "", 1)
    kernel = re.sub(r"__shared__\s+alignas\((\d+)\)", r"alignas(\1) static", kernel)
    kernel = re.sub(r"extern __shared__ __align__\(\d+\) uchar (\w+)\[\];", r"uchar* \1 = emu_blk->dyn.data();", kernel)
    args = ", ".join(f"{t} {n}" for t, n in params)
    names = ", ".join(n for _, n in params)
    wrapper = (f'extern "C" void emu_launch(int gx, int gy, int bx, int by, {args}) {{\n'
               f"  emu_run(gx, gy, bx, by, [=] {{ {name}({names}); }});\n}}\n")
    cpp = work_dir / f"{name}_emu.cpp"
    cpp.write_text(HEADER + _async_helpers(source) + kernel + "\n" + wrapper)
    so = work_dir / f"{name}_emu.so"
    res = subprocess.run([gxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", str(cpp), "-o", str(so)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"cuda_emu: g++ failed:\n{res.stderr[-3000:]}")
    lib = ctypes.CDLL(str(so))
    ctypes_of = {"int": ctypes.c_int, "float": ctypes.c_float}

    def launch(grid, block, *values):
        if len(values) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(values)}")
        conv = []
        for (typ, pname), v in zip(params, values):
            if typ.endswith("*"):
                if not (isinstance(v, np.ndarray) and v.flags.c_contiguous):
                    raise TypeError(f"{pname}: a C-contiguous NumPy array, got {type(v)}")
                conv.append(ctypes.c_void_p(v.ctypes.data))
            else:
                conv.append(ctypes_of[typ](v))
        lib.emu_launch(int(grid[0]), int(grid[1]), int(block[0]), int(block[1]), *conv)

    launch.params = params
    return launch
