"""The mma.sync GEMM space (``tuning/spaces/gemm_mma.py``), run on the CPU through the CUDA emulation.

A drawn schedule of the space is built for sm_90 as the tuner builds it (``cp.async`` on), and its
CUDA source runs under ``cuda_emu`` (threads, barriers, ``ldmatrix``, ``mma.sync`` with f16
accumulators, dynamic shared memory, TVM's ``cp.async`` helpers): the fused linear layer (matmul +
bias) must match NumPy. Covered: the skinny form of decode (8 rows padded to 16, one block row) and
the regular prefill form, swizzled and padded shared layouts, 2 and 3 pipeline stages. The GPU
verifies every stored record against the untuned kernel too; this catches an indexing or layout
fault in the space itself with no GPU.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from tuning import spaces
from tuning.builder import build_kernel
from tuning.spaces import workloads as wl
from tuning.tasks import normalize
from tuning.targets import make_target

from .cuda_emu import emulate

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")

TARGET = make_target("sm_90")

#: (rows, N, K, space, decisions of its categorical draws in trace order)
CASES = {
    # skinny: warps along N, fragments along N, K chunk, vector width (indices into their choices)
    "skinny_b8_s3_swizzle": (8, 256, 256, "gemm_mma/s3_swizzle", (1, 1, 0, 1)),   # 2 warps x 2 frags, K 32
    "skinny_b32_s2_pad": (32, 128, 384, "gemm_mma/s2_pad", (2, 0, 2, 0)),        # 4 warps x 1 frag, K 128
    # regular: warps M, warps N, fragments M, fragments N, K chunk, vector width
    "prefill_s64x2_s3_swizzle": (128, 128, 128, "gemm_mma/s3_swizzle", (1, 1, 1, 1, 0, 1)),  # 64x64 blocks
    "prefill_s2_pad": (128, 256, 128, "gemm_mma/s2_pad", (0, 2, 2, 0, 1, 0)),  # 64x64: 1x4 warps, 4x1 frags
}


def _scheduled(rows: int, n: int, k: int, space: str, decisions):
    mod = normalize(tvm.IRModule({"main": wl.linear(rows, 1, n, k, bias=True)}))
    named = dict(spaces.design_spaces(mod, target=TARGET, include_dlight=False))
    trace = named[space].trace
    cats = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
    assert len(cats) == len(decisions)
    sch = s_tir.Schedule(mod, seed=1, debug_mask=0)
    s_tir.schedule.Trace(trace.insts, dict(zip(cats, decisions))).apply_to_schedule(sch, remove_postproc=True)
    postprocs = ms.TuneContext(
        mod=mod, target=TARGET, task_name="t", num_threads=1,
        space_generator=ms.space_generator.ScheduleFn(
            lambda s: None, sch_rules=[], postprocs=spaces.postprocs_for(TARGET), mutator_probs={}),
    ).space_generator.postprocs
    sch.enter_postproc()
    assert all(p.apply(sch) for p in postprocs), "the drawn schedule fails a postprocessor"
    return sch


def _extent(script: str, tag: str) -> int:
    found = re.findall(r'thread_binding\((?:T\.int64\()?(\d+)\)?, thread="' + re.escape(tag) + '"\\)', script)
    return int(found[0]) if found else 1


def _run(src: str, sch, tmp_path, rows: int, n: int, k: int, *, bias: bool):
    """Launch the emulated kernel on seeded inputs; (output, f32 NumPy reference)."""
    script = sch.mod.script()
    grid = (_extent(script, "blockIdx.x"), _extent(script, "blockIdx.y"))
    block = (_extent(script, "threadIdx.x"), _extent(script, "threadIdx.y"))
    launch = emulate(src, tmp_path)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, 1, k)) * 0.5).astype(np.float16)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    b = (rng.standard_normal(n) * 0.1).astype(np.float16) if bias else np.zeros(n, np.float16)
    out = np.full((rows, 1, n), np.nan, np.float16)
    values = [b if "bias" in nm else w if "weight" in nm else x if nm.startswith("x") else out
              for _, nm in launch.params]
    assert sum(v is out for v in values) == 1, launch.params
    launch(grid, block, *values)
    return out, x.astype(np.float32) @ w.astype(np.float32).T + b.astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mma_gemm_matches_numpy_under_emulation(tmp_path, case):
    rows, n, k, space, decisions = CASES[case]
    sch = _scheduled(rows, n, k, space, decisions)
    if rows <= 64:
        assert _extent(sch.mod.script(), "blockIdx.y") == 1, "skinny: all rows in one block row"
    src = build_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()
    assert "mma.sync.aligned.m16n8k16" in src and "ldmatrix" in src and "cp.async" in src
    out, ref = _run(src, sch, tmp_path, rows, n, k, bias=True)
    err = np.abs(out.astype(np.float32) - ref)
    assert np.isfinite(out).all(), "rows or columns left unwritten"
    # f16 accumulation over K (one rounding per 16-wide step): within 2e-2 of the f32 reference
    assert err.max() < 2e-2, (case, float(err.max()))


def test_emulation_catches_a_wrong_ldmatrix_layout(tmp_path):
    """The check can fail: the same skinny kernel with its ldmatrix loads turned into transposed
    ones (a layout fault) no longer matches NumPy."""
    rows, n, k, space, decisions = CASES["skinny_b8_s3_swizzle"]
    sch = _scheduled(rows, n, k, space, decisions)
    src = build_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()
    bad = src.replace("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")
    assert bad != src
    out, ref = _run(bad, sch, tmp_path, rows, n, k, bias=False)
    assert np.abs(out.astype(np.float32) - ref).max() > 0.1
