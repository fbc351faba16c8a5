"""The mma.sync prefill attention kernel, run on the CPU through a CUDA emulation (``cuda_emu``).

The kernel's own CUDA source (``tvm.compile`` for sm_90) is compiled with g++ against an emulation
of threads, barriers, warp shuffles and ``mma.sync.m16n8k16`` (PTX ISA fragment layouts), and its
output and base-2 lse are compared with NumPy on a causal sequence and on a ragged batch. This is
the check that would have caught the fault the first GPU search found on 2026-12-02 (TVM declared the
Q fragments ``half2``, which doubles the mma operand offsets): the second test rebuilds that
declaration in the fixed kernel's source and sees the results go wrong, with no GPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm

from tuning import attention as A
from tuning import attention_tc as TC
from tuning.attention_measure import abs_error, ragged_batch_args, reference_causal_attention, reference_causal_lse
from tuning.targets import make_target

from .cuda_emu import emulate

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")

KEY = A.AttentionKey(h_kv=2, h_q=2, d=64, dtype="float16")


def _source(cfg):
    func = TC.make_tc_ragged_prefill(cfg, KEY, make_target("sm_90"))
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=make_target("sm_90"))
    return ex.mod.imports[0].inspect_source()


def _run(launch, cfg, lengths, seed=0):
    _, q, k, v, indptr, sm_scale = ragged_batch_args(KEY, lengths, device=tvm.cpu(), seed=seed)
    n = q.shape[0]
    out = np.full((n, KEY.h_q, KEY.d), np.nan, np.float16)
    lse = np.full((n, KEY.h_q), np.nan, np.float32)
    values = {"q_ptr": q, "k_ptr": k, "v_ptr": v, "q_indptr_ptr": indptr, "kv_indptr_ptr": indptr.copy(),
              "output_ptr": out, "lse_ptr": lse, "batch_size": len(lengths), "causal": 1, "qo_len": n, "kv_len": n,
              "q_indptr_elem_offset": 0, "kv_indptr_elem_offset": 0, "sm_scale": sm_scale}
    tq = 16 * cfg.num_warps
    grid = (-(-n // tq) + len(lengths), KEY.h_kv)
    launch(grid, (32, cfg.num_warps), *[values[name] for _, name in launch.params])
    errs = []  # per sequence: (output, lse) max abs error; NaN (a row not written) or inf is inf
    for a, b in zip(indptr[:-1], indptr[1:]):
        ref_out = reference_causal_attention(q[a:b], k[a:b], v[a:b], sm_scale)
        ref_lse = reference_causal_lse(q[a:b], k[a:b], sm_scale)
        errs.append((abs_error(out[a:b], ref_out), abs_error(lse[a:b], ref_lse)))
    return errs


@pytest.mark.parametrize("cfg", [TC.TCConfig(2, 32, mma=True), TC.TCConfig(4, 64, prefetch=True, mma=True),
                                 TC.TCConfig(2, 32, prefetch=True, mma=True, stages=2)])
def test_mma_attention_matches_numpy_under_emulation(tmp_path, cfg):
    launch = emulate(_source(cfg), tmp_path)
    for lengths in ((100,), (37, 70, 5)):
        for out_err, lse_err in _run(launch, cfg, lengths):
            assert out_err < 2e-2 and lse_err < 1e-2, (lengths, out_err, lse_err)


def test_emulation_catches_the_half2_fragment_fault(tmp_path):
    """The same check on the source TVM emitted for the 2026-12-02 kernel (Q fragments as half2):
    the emulation reproduces its wrong results, so this test can fail."""
    cfg = TC.TCConfig(2, 32, mma=True)
    src = _source(cfg)
    assert "half qf_ptr[" in src
    n_frag = int(src.split("half qf_ptr[")[1].split("]")[0])
    broken = src.replace(f"half qf_ptr[{n_frag}];", "QF_DECL;").replace("qf_ptr[", "((half*)qf_ptr)[")
    # as half2 elements the k-step offsets of the mma operands double (kk * 16 halves instead of kk * 8);
    # the array is made twice as long and zeroed so that the wrong reads stay inside it
    broken = broken.replace("QF_DECL;", f"half2 qf_ptr[{n_frag}] = {{}};")
    launch = emulate(broken, tmp_path)
    errs = _run(launch, cfg, (100,))
    assert errs[0][0] > 0.1 and errs[0][1] > 0.1  # wrong scores: wrong output and lse
