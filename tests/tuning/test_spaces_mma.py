"""The mma.sync GEMM design space (``tuning.spaces.gemm_mma``): registration, draws that pass the
postprocessors and build for sm_90, CUDA that nvcc compiles. CPU only (nothing runs here: the
numerical check is ``scripts/mma_check.py`` on a GPU)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import tvm
from tvm.support import nvcc

from tuning import spaces
from tuning.builder import build_kernel
from tuning.spaces import gemm_mma
from tuning.spaces import workloads as wl
from tuning.targets import make_target

TARGET = make_target("sm_90")
NVCC = shutil.which("nvcc") is not None

#: The prefill GEMMs of GPT-2 small the space is for (fused epilogues as in the model).
KERNELS = {
    "qkv_1024x768x2304_bias": lambda: wl.linear(1, 1024, 2304, 768),
    "fc2_1024x3072x768_bias_residual": lambda: wl.linear(1, 1024, 768, 3072, epilogue="residual"),
    "fc1_1024x768x3072_bias_gelu": lambda: wl.linear(1, 1024, 3072, 768, epilogue="gelu"),
    "proj_128x768x768_bias": lambda: wl.linear(1, 128, 768, 768),
    "lm_head_128x768x50257": lambda: wl.linear(1, 128, 50257, 768, bias=False),
}


def _ptxas_info(src: str, folder) -> str:
    path = folder / "k.cu"
    path.write_text(src)
    res = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-cubin", "-Xptxas", "-v", "-o",
                          str(folder / "k.cubin"), str(path)], capture_output=True, text=True,
                         check=True)
    return res.stderr


def _mma_names(func, target):
    return [n for n, _ in spaces.design_spaces(func, target=target, include_dlight=False)
            if n.startswith("gemm_mma/")]


def test_registered_beside_wmma_on_sm80_plus_only():
    func = wl.linear(1, 128, 768, 768)
    names = {n for n, _ in spaces.design_spaces(func, target=TARGET)}
    assert {f"gemm_mma/{v}" for v in gemm_mma.MMA_VARIANTS} <= names
    assert {"gemm_tc/pipelined", "gemm_tc/plain", "dlight"} <= names  # still candidates
    assert _mma_names(func, make_target("sm_75")) == []  # no cp.async / m16n8k16 path before sm_80
    # decode GEMVs: their own spaces, and from 8 rows the skinny form of the mma spaces
    assert _mma_names(wl.linear(4, 1, 768, 768), TARGET) == []
    assert len(_mma_names(wl.linear(8, 1, 768, 768), TARGET)) == len(gemm_mma.MMA_VARIANTS)


def test_bad_input():
    with pytest.raises(ValueError, match="variant"):
        gemm_mma.schedule_gemm_mma(tvm.s_tir.Schedule(tvm.IRModule({"main": wl.linear(1, 128, 64, 64)})),
                                   variant="s5_swizzle")
    # fp32 operands: not applicable (one clear reason, no crash)
    func = wl.linear(1, 128, 64, 64, dtype="float32")
    with pytest.raises(spaces.NotApplicable, match="float16"):
        gemm_mma.schedule_gemm_mma(tvm.s_tir.Schedule(tvm.IRModule({"main": func})))
    assert gemm_mma.mma_pad(50257) == 256 and gemm_mma.mma_pad(128) == 128
    assert gemm_mma.mma_pad(32) == gemm_mma.mma_pad(8) == 16 and gemm_mma.mma_pad(65) == 128


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KERNELS))
def test_draws_postprocess_build_and_compile(name, tmp_path):
    """Random draws of the mma spaces pass every postprocessor (VerifyGPUCode against the opt-in
    shared memory included), build for sm_90 as the tuner builds them (tuning.builder: async-copy
    config) and without that config, contain the
    mma/ldmatrix/cp.async instructions, and one per kernel compiles to a cubin with nvcc."""
    func = KERNELS[name]()
    cands, stats = spaces.sample_candidates(func, target=TARGET, num=2, seed=3, include_dlight=False,
                                            only=("gemm_mma/",), max_attempts=24)
    assert len(cands) == 2, stats
    assert all(c.space.startswith("gemm_mma/") for c in cands)
    for i, cand in enumerate(cands):
        # the tuner's build (builder, verifier, validate and the compiled library share it)
        src = build_kernel(cand.sch.mod, TARGET).mod.imports[0].inspect_source()
        assert "mma.sync.aligned.m16n8k16.row.col" in src
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in src
        assert re.search(r"cp\.async\.c[ag]\.shared\.global", src), "no cp.async with the config"
        assert "cp.async.wait_group" in src
        # the steady-state wait keeps stages - 1 tiles in flight while one is computed
        stages = int(cand.space.split("/")[1][1])
        assert f"async_wait_group_{stages - 1}()" in src, cand.space
        # the operand fragments are per-lane register arrays, not whole-warp arrays
        assert not re.search(r"threadIdx\.x\)\s*\*\s*\(int64_t\)8\)\)\)\)\[0\]", src)
        if i == 0 and NVCC:
            with TARGET:
                cubin = nvcc.compile_cuda(src, target_format="cubin", compiler="nvcc")
            assert len(cubin) > 0
            # fragments and accumulators in registers: no local-memory stack frame
            assert "0 bytes stack frame" in _ptxas_info(src, tmp_path), cand.space
    # without the config the same kernel builds with synchronous copies
    plain = tvm.compile(cands[0].sch.mod, target=TARGET).mod.imports[0].inspect_source()
    assert "mma.sync" in plain and not re.search(r"cp_async_legacy_c[ag]_\d+\(", plain.split("__global__")[-1])


def test_reading_a_database_registers_the_mma_intrinsics(tmp_path):
    """A process that only compiles or validates (it never imports the spaces) must still replay
    mma-space records: reading a database registers the intrinsics they name. Without this, the
    records failed to replay and compile silently used untuned kernels (seen on an H200)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from tuning.dbfiles import parse_database\n"
            "assert 'tuning.spaces.gemm_mma' not in sys.modules\n"
            f"parse_database({str(tmp_path)!r})\n"
            "from tvm.s_tir import TensorIntrin\n"
            "from tuning.spaces import gemm_mma as g\n"
            "names = [g.LDMATRIX_A, g.LDMATRIX_B_TRANS, *g.MMA_STORE.values(), *g.MMA_TRANS_B.values()]\n"
            "missing = [n for n in names if TensorIntrin.get(n, allow_missing=True) is None]\n"
            "assert not missing, missing\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
