"""The tensor-core prefill attention template (tuning.attention_tc): build, legality, attention.json, apply.

The kernel's numerics are checked on the GPU (``bench/device/attn_tc_check.py`` and the GPU-marked
test below); here it is built for sm_90 and compiled with nvcc, and the reference the search
checks its ``lse`` against is checked against TVM's own CPU kernel.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import tvm
import tvm_ffi

from gpt2_model.config import GPT2Config
from gpt2_model.export import export_model
from tuning import attention as A
from tuning import attention_tc as TC
from tuning.targets import make_target

KEY = A.AttentionKey(h_kv=2, h_q=2, d=64, dtype="float16")


@pytest.fixture(scope="module")
def sm90():
    return make_target("sm_90")


def test_lse_reference_matches_tvm_cpu_kernel():
    """The base-2 lse reference agrees with what TVM's own (CPU) ragged prefill kernel writes."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    key = A.AttentionKey(h_kv=2, h_q=2, d=16, dtype="float32")
    func = _attention_prefill_ragged_cpu(key.h_kv, key.h_q, key.d, key.d, key.dtype, {})
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    args, q, k, _, sm_scale = A.ragged_prefill_args(key, 29, device=tvm.cpu(), seed=5)
    lib["main"](*args, 1, 0, 1.0, 1.0, sm_scale)
    ref = A.reference_causal_lse(q, k, sm_scale)
    assert ref.shape == (29, 2)
    np.testing.assert_allclose(args[8].numpy(), ref, rtol=1e-4, atol=1e-4)
    # first row sees one key: lse = its scaled score in base 2
    np.testing.assert_allclose(ref[0], (q[0] * k[0]).sum(-1) * sm_scale / np.log(2), rtol=1e-5)


def test_candidates_and_legality(sm90):
    cands = TC.tc_candidates(KEY, sm90)
    assert TC.TCConfig(4, 64) in cands and len(set(cands)) == len(cands) >= 6
    assert all(TC.tc_shared_bytes(c, KEY.d) <= 48 * 1024 for c in cands)
    assert TC.TCConfig(8, 64) not in cands  # 128-row tiles exceed 48 KiB of static shared memory
    # tensor cores take fp16 operands: no candidates, and a clear error, for fp32
    f32 = A.AttentionKey(2, 2, 64, "float32")
    assert TC.tc_candidates(f32, sm90) == []
    with pytest.raises(TC.TCError, match="not supported"):
        TC.make_tc_ragged_prefill(TC.TCConfig(4, 64), f32, sm90)
    with pytest.raises(TC.TCError):
        TC.make_tc_ragged_prefill(TC.TCConfig(3, 64), KEY, sm90)
    assert A.config_of("tc", {"num_warps": 2, "tile_k": 32}) == TC.TCConfig(2, 32)
    assert TC.template_of(TC.TCConfig(2, 32)) == "tc" and TC.template_of(A.PrefillConfig(16, 32, 32, 4, 4)) == "simt"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("cfg, syncs", [(TC.TCConfig(4, 64), 6), (TC.TCConfig(1, 32, kv_warps=2, prefetch=True), 8)])
def test_tc_kernel_builds_for_sm90_and_compiles_with_nvcc(sm90, cfg, syncs):
    """The kernel lowers for sm_90 to CUDA with wmma calls and nvcc compiles it to a cubin."""
    from tvm.support import nvcc

    func = TC.make_tc_ragged_prefill(cfg, A.AttentionKey(12, 12, 64, "float16"), sm90)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=sm90)
    source = ex.mod.imports[0].inspect_source()
    # unrolled: (tile_k/16) x (64/16) fragment products for S and as many for P V
    assert source.count("wmma::mma_sync") == 2 * cfg.tile_k // 16 * 4 and f"__launch_bounds__({32 * cfg.num_warps * cfg.kv_warps})" in source
    # only the barriers the kernel places: 1 after the Q load, 2 per key step around the K/V store,
    # 1 after S, 1 after P (softmax state stays in registers); key-split warps add the merge's 2
    assert source.count("__syncthreads()") == syncs
    with sm90:
        cubin = nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")
    assert len(cubin) > 1000


def _gpt2_tiny():
    return GPT2Config(vocab_size=101, n_positions=64, n_embd=128, n_layer=1, n_head=2)


def _write(tmp_path, best: dict, key=KEY):
    doc = {"kernels": [{"kernel": A.RAGGED_PREFILL, "key": asdict(key), "lengths": [64],
                        "default": {"template": "simt", "config": asdict(A.PrefillConfig(16, 32, 32, 4, 4))},
                        "best": best}]}
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps(doc))


def test_apply_swaps_in_the_tc_kernel(tmp_path, sm90):
    from tuning.pipeline import prepare

    ex = export_model(_gpt2_tiny(), quantization="q0f16", target=sm90)
    ex.mod = prepare(ex.mod, target=sm90)
    before = ex.mod[A.RAGGED_PREFILL]
    cfg = TC.TCConfig(num_warps=2, tile_k=32)
    _write(tmp_path, {"template": "tc", "config": asdict(cfg)})
    assert A.read_attention(tmp_path)["kernels"][0]["best"]["template"] == "tc"
    mod, applied = A.apply_attention(ex.mod, tmp_path, key=KEY, target=sm90)
    assert len(applied) == 1 and "tc warps=2" in applied[0]
    got = mod[A.RAGGED_PREFILL]
    assert tvm_ffi.structural_equal(got.without_attr("op_pattern"),
                                    TC.make_tc_ragged_prefill(cfg, KEY, sm90))
    assert got.attrs["global_symbol"] == before.attrs["global_symbol"]
    assert got.attrs["op_pattern"] == before.attrs["op_pattern"]
    assert "wmma.matrix_a" in got.script() and not tvm_ffi.structural_equal(got, before)
    assert ex.mod[A.RAGGED_PREFILL].same_as(before)


def test_unknown_template_is_one_clear_error(tmp_path, sm90):
    _write(tmp_path, {"template": "wgmma", "config": {"num_warps": 4, "tile_k": 64}})
    with pytest.raises(A.AttentionError, match="not a valid attention tuning file"):
        A.read_attention(tmp_path)
    _write(tmp_path, {"template": "tc", "config": {"num_warps": 4}})
    with pytest.raises(A.AttentionError, match="re-run"):
        A.apply_attention(tvm.IRModule(), tmp_path, key=KEY, target=sm90)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [TC.TCConfig(4, 64), TC.TCConfig(4, 64, prefetch=True, mma=True),
                                 TC.TCConfig(2, 32, mma=True)])
def test_tc_kernel_matches_numpy_on_gpu(cfg):
    """On a CUDA GPU: output and lse of a causal 300-token prefill match NumPy (wmma and mma.sync)."""
    from gpt2_model.device import detect_cuda_arch

    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU")
    target = make_target(detect_cuda_arch())
    key = A.AttentionKey(4, 4, 64, "float16")
    func = TC.make_tc_ragged_prefill(cfg, key, target)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    args, q, k, v, sm_scale = A.ragged_prefill_args(key, 300, device=dev, seed=1)
    lib["main"](*args, 1, 0, 1.0, 1.0, sm_scale)
    np.testing.assert_allclose(args[7].numpy().astype(np.float32), A.reference_causal_attention(q, k, v, sm_scale),
                               atol=2e-2)
    np.testing.assert_allclose(args[8].numpy(), A.reference_causal_lse(q, k, sm_scale), atol=1e-2)


def test_search_stores_the_tc_winner_and_rejects_a_wrong_one(tmp_path, sm90, monkeypatch):
    """tune_attention's bookkeeping with both templates (GPU work faked: build paths and timings).

    A tensor-core candidate faster than TVM's kernel is stored with ``"template": "tc"`` (and
    applies), a faster one whose NumPy error exceeds the tolerance is not.
    """
    default = A.default_prefill_config(KEY, sm90)
    good, wrong = TC.TCConfig(2, 64), TC.TCConfig(1, 64)
    fake = {0: ({64: 100.0, 256: 400.0}, 1e-3), 1: ({64: 20.0, 256: 60.0}, 2e-3), 2: ({64: 10.0, 256: 30.0}, 0.5)}
    monkeypatch.setattr(A, "_build_all", lambda funcs, target, workers: ([f"k{i}" for i in range(len(funcs))], []))
    monkeypatch.setattr(tvm.runtime, "load_module", lambda path: path)
    monkeypatch.setattr(A, "measure_ragged_prefill", lambda lib, key, lengths, **kw: fake[int(lib[1:])])

    class Dev:  # what tune_attention reads of a device
        exist = True
        device_name = "fake"

    doc = A.tune_attention(_gpt2_tiny(), dtype="float16", target=sm90, out_dir=tmp_path, lengths=[64, 256],
                           device=Dev(), candidates=[default, good, wrong], log=lambda m: None)
    entry = doc["kernels"][0]
    assert entry["best"]["template"] == "tc" and entry["best"]["config"] == asdict(good)
    assert entry["default"]["template"] == "simt" and entry["rejected_numerics"] == 1
    assert {(r["template"], r["config"]["num_warps"]) for r in entry["screened"]} >= {("tc", 1), ("tc", 2)}
    stored = A.read_attention(tmp_path)["kernels"][0]["best"]
    assert A.config_of(stored["template"], stored["config"]) == good


def test_mma_variant_candidates_legality_and_stored_form(sm90):
    """The mma.sync variant: its own grid (fp16 only, static shared memory within 48 KiB), its label,
    and the stored config round trip (records written before the field existed still load)."""
    big = A.AttentionKey(12, 12, 64, "float16")
    cands = TC.mma_candidates(big, sm90)
    assert cands and all(c.mma and c.kv_warps == 1 for c in cands)
    assert all(TC.tc_shared_bytes(c, 64) <= 48 * 1024 for c in cands)
    assert TC.TCConfig(8, 128, mma=True) not in cands  # Q 128 rows + K 128 keys + Vᵀ: 53 KiB
    assert set(cands) <= set(TC.tc_candidates(big, sm90))
    assert TC.mma_candidates(A.AttentionKey(2, 2, 64, "float32"), sm90) == []
    cfg = TC.TCConfig(4, 64, prefetch=True, mma=True)
    assert cfg.label() == "tc mma warps=4 tile=64x64 prefetch" and TC.template_of(cfg) == "tc"
    two = TC.TCConfig(4, 64, prefetch=True, mma=True, stages=2)
    assert two in cands and two.label().endswith("2-stage")
    assert TC.TCConfig(4, 64, mma=True, stages=2) not in cands  # double buffering stages through registers
    assert not TC.is_tc_legal(TC.TCConfig(4, 64, prefetch=True, stages=2), big, sm90)  # wmma: one stage only
    assert A.config_of("tc", asdict(cfg)) == cfg
    assert A.config_of("tc", {"num_warps": 1, "tile_k": 16, "row_lanes": 2, "prefetch": True,
                              "kv_warps": 4}).mma is False


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("cfg, syncs", [(TC.TCConfig(4, 64, prefetch=True, mma=True), 3),
                                        (TC.TCConfig(2, 32, mma=True), 3),
                                        (TC.TCConfig(4, 64, prefetch=True, mma=True, stages=2), 4)])
def test_mma_kernel_builds_for_sm90_with_register_fragments(sm90, cfg, syncs):
    """The mma.sync variant lowers to m16n8k16 mma.sync with S, P and O in registers: no wmma, no
    barrier inside a key step beyond the two around the K/V store, quad shuffles for the softmax,
    and nvcc compiles it."""
    from tvm.support import nvcc

    func = TC.make_tc_ragged_prefill(cfg, A.AttentionKey(12, 12, 64, "float16"), sm90)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=sm90)
    source = ex.mod.imports[0].inspect_source()
    # per key step: (tile_k / 8) x (64 / 16) products for S and (tile_k / 16) x (64 / 8) for P V
    assert source.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 2 * (cfg.tile_k // 8) * 4
    assert "wmma::" not in source and f"__launch_bounds__({32 * cfg.num_warps})" in source
    # 1 stage: after the Q load, and around each step's K/V store. 2 stages: after the Q load, after
    # the prologue's store, and per step one after the store into the other buffer plus one that
    # TVM's ThreadSync adds before it (it does not tell the two halves of the buffer apart)
    assert source.count("__syncthreads()") == syncs
    assert source.count("__shfl_xor_sync") >= 6  # max and sum over the 4 lanes of rows g and g + 8
    with sm90:
        cubin = nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")
    assert len(cubin) > 1000


def test_search_candidates_by_family_keep_tvms_and_the_stored_choice(sm90):
    key = A.AttentionKey(12, 12, 64, "float16")
    default = A.default_prefill_config(key, sm90)
    stored_cfg = TC.TCConfig(1, 16, prefetch=True, kv_warps=4)
    stored = {"kernel": A.RAGGED_PREFILL, "key": asdict(key), "best": {"template": "tc", "config": asdict(stored_cfg)}}
    only_mma = A.search_candidates(key, sm90, ["mma"], stored=stored)
    assert only_mma[0] == default and stored_cfg in only_mma
    assert [c for c in only_mma if c not in (default, stored_cfg)] == TC.mma_candidates(key, sm90)
    every = A.search_candidates(key, sm90)  # "fa" only when named (not yet checked on a card)
    assert len(every) == len(A.prefill_candidates(key, sm90)) + len(TC.tc_candidates(key, sm90))
    with_fa = A.search_candidates(key, sm90, ["simt", "tc", "mma", "fa"])
    assert len(with_fa) == len(every) + len(A.fa_candidates(key, sm90)) > len(every)
    # another key's stored choice is not this search's
    other = dict(stored, key=asdict(A.AttentionKey(2, 2, 64, "float16")))
    assert stored_cfg not in A.search_candidates(key, sm90, ["mma"], stored=other)


@pytest.mark.parametrize("cfg", [TC.TCConfig(4, 64, prefetch=True, mma=True), TC.TCConfig(1, 32, mma=True)])
def test_mma_fragment_arrays_keep_half_elements(sm90, cfg):
    """Every array an ``mma.sync`` operand points into is declared ``half`` / ``float``: the operand
    offsets are counted in those elements. (2026-12-02, H200: vectorized stores into the Q fragments
    made TVM declare them ``half2``, the k-step offsets pointed twice as far, and 18 of 19 candidates
    failed the NumPy check.)"""
    import re

    func = TC.make_tc_ragged_prefill(cfg, A.AttentionKey(12, 12, 64, "float16"), sm90)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=sm90)
    source = ex.mod.imports[0].inspect_source()
    decl = dict((name, typ) for typ, name in re.findall(r"alignas\(\d+\) (\w+) (\w+)\[\d+\];", source))
    operands = set(re.findall(r"\(\((?:unsigned|float) \*\)\((\w+) \+ \d+\)\)", source))
    assert {"qf_ptr", "kb_ptr", "pf_ptr", "vb_ptr", "sacc_ptr", "oacc_ptr"} <= operands
    for name in operands:
        assert decl[name] in ("half", "float"), (name, decl[name])
