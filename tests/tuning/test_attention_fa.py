"""The wgmma flash-attention prefill template (tuning.attention_fa): legality, registry, sm_90a build, numerics on a GPU.

On this CPU machine every candidate is lowered for sm_90 and its CUDA compiled by nvcc for sm_90a
(0 spill bytes); the numerics need an H100/H200 (the GPU-marked test, ``scripts/attn_fa_check.py``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import tvm
import tvm_ffi

from gpt2_model import wgmma_build as WB
from gpt2_model.config import GPT2Config
from tuning import attention as A
from tuning import attention_fa as FA
from tuning.attention_build import is_tirx_kernel
from tuning.attention_measure import ragged_batch_args, reference_causal_attention, reference_causal_lse
from tuning.targets import make_target

KEY = A.AttentionKey(h_kv=12, h_q=12, d=64, dtype="float16")
#: Ragged causal cases of the GPU check: single sequences (shorter than a tile, odd, one tile, many)
#: and a batch whose sequences end inside tiles.
GPU_CASES = ([1], [17], [128], [300, 64, 5], [1024])


@pytest.fixture(scope="module")
def sm90():
    return make_target("sm_90")


def test_candidates_only_for_fp16_d64_mha_on_sm90(sm90):
    cands = FA.fa_candidates(KEY, sm90)
    assert cands == list(FA.FA_CANDIDATES) and 4 <= len(cands) <= 12 and len(set(cands)) == len(cands)
    assert all(FA.fa_smem_bytes(c) <= 227 * 1024 for c in cands)
    assert {c.tile_q for c in cands} == {64, 128} and {c.producer for c in cands} == {True, False}
    assert FA.fa_candidates(KEY, make_target("sm_80")) == []
    assert FA.fa_candidates(A.AttentionKey(2, 2, 64, "float16"), sm90) == cands  # any head count
    for bad, match in ((A.AttentionKey(12, 12, 64, "float32"), "fp16"),
                       (A.AttentionKey(4, 12, 64, "float16"), "h_q=12 != h_kv=4"),
                       (A.AttentionKey(12, 12, 128, "float16"), "head dim 128")):
        assert FA.fa_candidates(bad, sm90) == []
        with pytest.raises(FA.FAError, match=match):
            FA.make_fa_ragged_prefill(cands[0], bad, sm90)
    with pytest.raises(FA.FAError, match="sm_90"):
        FA.make_fa_ragged_prefill(cands[0], KEY, make_target("sm_80"))
    with pytest.raises(FA.FAError, match="stages"):
        FA.make_fa_ragged_prefill(FA.FAConfig(128, 128, 4), KEY, sm90)


def test_registry_round_trip_and_search_families(sm90, tmp_path):
    cfg = FA.FAConfig(64, 128, 2, producer=False)
    assert A.config_of("fa", asdict(cfg)) == cfg
    assert cfg.label() == "fa wgmma tile=64x128 stages=2"
    doc = {"kernels": [{"kernel": A.RAGGED_PREFILL, "key": asdict(KEY), "lengths": [64],
                        "default": {"template": "simt", "config": asdict(A.default_prefill_config(KEY, sm90))},
                        "best": {"template": "fa", "config": asdict(cfg)}}]}
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps(doc))
    assert A.stored_best(A.read_attention(tmp_path)["kernels"][0]) == cfg
    only_fa = A.search_candidates(KEY, sm90, ["fa"])
    assert only_fa[0] == A.default_prefill_config(KEY, sm90) and only_fa[1:] == FA.fa_candidates(KEY, sm90)
    assert not any(isinstance(c, FA.FAConfig) for c in A.search_candidates(KEY, make_target("sm_80")))
    func = A.make_prefill_kernel(cfg, KEY, sm90)
    assert is_tirx_kernel(func) and func.attrs["tirx.is_scheduled"]


def test_apply_swaps_in_the_fa_kernel_and_marks_the_module_mixed(tmp_path, sm90):
    from gpt2_model.export import export_model
    from tuning.pipeline import prepare

    small = GPT2Config(vocab_size=101, n_positions=64, n_embd=128, n_layer=1, n_head=2)
    key = A.attention_key(small, "float16")
    ex = export_model(small, quantization="q0f16", target=sm90)
    mod = prepare(ex.mod, target=sm90)
    cfg = FA.FAConfig(128, 64, 2, producer=False)
    doc = {"kernels": [{"kernel": A.RAGGED_PREFILL, "key": asdict(key), "lengths": [64],
                        "default": {"template": "simt", "config": asdict(A.default_prefill_config(key, sm90))},
                        "best": {"template": "fa", "config": asdict(cfg)}}]}
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps(doc))
    out, applied = A.apply_attention(mod, tmp_path, key=key, target=sm90)
    assert len(applied) == 1 and "fa wgmma tile=128x64" in applied[0]
    got = out[A.RAGGED_PREFILL]
    assert tvm_ffi.structural_equal(got.without_attr("op_pattern"), FA.make_fa_ragged_prefill(cfg, key, sm90))
    # compile.build_module lowers modules holding it with the mixed tirx/s_tir pipeline (CUDA source here)
    assert WB.has_wgmma_kernels(out) and not WB.has_wgmma_kernels(mod)
    from tuning.compile import build_module
    from tuning.untuned import apply_dlight

    exe = build_module(out, target=sm90, scheduled=apply_dlight(out, target=sm90))
    cuda = exe.mod.imports[0].imports[0].inspect_source()
    assert "batch_prefill_ragged_kv_kernel(const __grid_constant__ CUtensorMap" in cuda
    assert cuda.count("wgmma_f16_rs_mma_async") == 64 // 16 + 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("cfg", FA.FA_CANDIDATES, ids=lambda c: c.label().replace(" ", "_"))
def test_every_candidate_compiles_for_sm90a_without_spills(sm90, cfg):
    """Lowered for sm_90 (tirx pipeline), the CUDA holds the expected wgmma / TMA instructions and
    nvcc compiles it for sm_90a with no spills."""
    source = WB.cuda_source(WB.build(FA.make_fa_ragged_prefill(cfg, KEY, sm90), sm90))
    assert source.count(f"wgmma_f16_ss_mma_async_sync_aligned_m64n{cfg.tile_k}k16_f32_f16_f16_1_1_0_0(") == 64 // 16 + 1
    assert source.count("wgmma_f16_rs_mma_async_sync_aligned_m64n64k16_f32_f16_f16_1_1_1(") == cfg.tile_k // 16 + 1
    assert source.count("bulk_tensor_3d") >= 3 and f"__launch_bounds__({cfg.threads()})" in source
    assert ("setmaxnreg" in source) == (cfg.producer and cfg.tile_q == 128)
    _, log = WB.compile_cubin(source)
    summary = WB.ptxas_summary(log)
    assert summary.get("spill_bytes", 0) == 0, summary
    assert summary["registers"] <= (168 if cfg.threads() == 384 else 255)


def _gpu_target():
    from gpt2_model.device import detect_cuda_arch

    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU")
    arch = detect_cuda_arch()
    if not arch.startswith("sm_90"):
        pytest.skip(f"wgmma needs sm_90, this GPU is {arch}")
    return dev, make_target(arch)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", FA.FA_CANDIDATES, ids=lambda c: c.label().replace(" ", "_"))
def test_fa_kernel_matches_numpy_on_gpu(cfg):
    """On an H100/H200: output and lse of causal ragged prefills match NumPy per sequence (every
    element written: the outputs start as NaN)."""
    dev, target = _gpu_target()
    WB.install_compile_hook()
    key = A.AttentionKey(12, 12, 64, "float16")
    fn = WB.build(FA.make_fa_ragged_prefill(cfg, key, target), target)["main"]
    for case in GPU_CASES:
        args, q, k, v, indptr, sm_scale = ragged_batch_args(key, case, device=dev, seed=len(case))
        args[7].copyfrom(np.full(args[7].shape, np.nan, key.dtype))
        args[8].copyfrom(np.full(args[8].shape, np.nan, np.float32))
        fn(*args, *A.prefill_scalars(sm_scale))
        dev.sync()
        out, lse = args[7].numpy().astype(np.float32), args[8].numpy()
        for a, b in zip(indptr[:-1], indptr[1:]):
            np.testing.assert_allclose(out[a:b], reference_causal_attention(q[a:b], k[a:b], v[a:b], sm_scale),
                                       atol=2e-2, err_msg=f"{cfg.label()} {case} output")
            np.testing.assert_allclose(lse[a:b], reference_causal_lse(q[a:b], k[a:b], sm_scale), atol=1e-2,
                                       err_msg=f"{cfg.label()} {case} lse")
