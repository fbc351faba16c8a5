"""The Hopper wgmma GEMM (``gpt2_model.wgmma_gemm``): its CUDA compiles for sm_90a (nvcc, no GPU
needed), the model's wiring (which prefill GEMMs run it, with which operands: a plain TE form of the
same arguments and arithmetic built for the CPU, prompt logits vs HF), a mixed build of real kernels
next to scheduled ones for sm_90, the database file's reading, and (GPU-marked) the search on a card."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
import tvm
import tvm_ffi

from gpt2_model.config import get_config
from gpt2_model.export import export_model
from gpt2_model.wgmma_gemm import EPILOGUES, GemmConfig, GemmKey, config_problem, make_gemm, parse_config
from gpt2_model.wgmma_plan import GemmPlan, make_gemm_reference
from tuning.targets import make_target
from tuning.wgmma_tune import (CANDIDATES, gemm_candidates, gemm_keys, gemm_plan_for, plain_elsewhere, read_gemm_plan,
                               reference_gemm)

CUDA = make_target("sm_90")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit) to compile")


def test_keys_candidates_and_config_names():
    keys = gemm_keys(get_config("gpt2"), dtype="float16", lengths=[1024, 128, 512, 100])
    names = {k.name() for k in keys}
    assert len(keys) == 12 and "m1024_n2304_k768_bias" in names and "m128_n768_k3072_bias_residual" in names
    assert not any(k.m == 100 for k in keys)  # no tile divides 100 rows: that chunk keeps its partition kernels
    assert gemm_keys(get_config("gpt2"), dtype="float32", lengths=[128]) == []
    for key in keys:
        assert len(gemm_candidates(key)) >= 8
    for text in CANDIDATES:
        assert parse_config(text).label() == text
    with pytest.raises(ValueError, match="bad wgmma GEMM config"):
        parse_config("128x128")
    key = GemmKey(128, 768, 768, "bias")
    assert "not multiples of the tile" in config_problem(GemmKey(128, 760, 768, "bias"), parse_config(CANDIDATES[0]))
    assert config_problem(GemmKey(96, 768, 768, "bias"), parse_config(CANDIDATES[0])) is None  # last row tile partial
    assert "192 accumulator registers" in config_problem(key, GemmConfig(128, 256, 64, 4, 1))
    assert "float16 only" in config_problem(GemmKey(128, 768, 768, "bias", "float32"), GemmConfig())
    with pytest.raises(ValueError, match="m96_n760_k768_bias"):
        make_gemm(GemmKey(96, 760, 768, "bias"), GemmConfig())


def test_decode_batch_keys_and_what_the_fused_kernels_take():
    from gpt2_model.norm_gemv import NormGemvConfig, NormGemvKey  # pylint: disable=import-outside-toplevel
    from gpt2_model.norm_gemv_plan import NormGemvPlan  # pylint: disable=import-outside-toplevel
    from tuning.wgmma_tune import fused_elsewhere  # pylint: disable=import-outside-toplevel

    keys = gemm_keys(get_config("gpt2"), dtype="float16", batches=[1, 8, 16, 32, 64])
    assert sorted({k.m for k in keys}) == [16, 32, 64] and all(k.rows for k in keys) and len(keys) == 12
    key = GemmKey(32, 768, 3072, "bias_residual", rows=True)
    assert key.name() == "b32_n768_k3072_bias_residual" and key in keys
    assert (key.shape_in(), key.shape_out()) == ((32, 1, 3072), (32, 1, 768))
    assert GemmKey(32, 768, 3072, "bias_residual").name() == "m32_n768_k3072_bias_residual"  # a prefill chunk
    qkv = GemmKey(32, 2304, 768, "bias", rows=True)
    plan = NormGemvPlan({NormGemvKey(batch=32, k=768, n=2304, epilogue="bias").name(): NormGemvConfig(4, 1)},
                        reference=True)
    assert fused_elsewhere(qkv, plan) and not fused_elsewhere(key, plan)
    assert not fused_elsewhere(GemmKey(32, 2304, 768, "bias"), plan)  # prefill chunks are never fused
    assert not fused_elsewhere(qkv, None)
    # a GEMM the template runs in its plain form (after ln_2 alone, or c_proj + residual) is searched
    # against that kernel: the wgmma kernel needs no fused norm to take it
    fc1 = GemmKey(16, 3072, 768, "bias_gelu", rows=True)
    plain_key = NormGemvKey(batch=16, k=768, n=3072, epilogue="bias_gelu", prologue="none")
    plain = NormGemvPlan({plain_key.name(): NormGemvConfig(4, 1, mma=True)}, reference=True)
    assert not fused_elsewhere(fc1, plain)
    assert plain_elsewhere(fc1, plain) == (plain_key, NormGemvConfig(4, 1, mma=True))
    assert plain_elsewhere(GemmKey(32, 3072, 768, "bias_gelu", rows=True), plain) is None
    assert plain_elsewhere(GemmKey(16, 3072, 768, "bias_gelu"), plain) is None  # a prefill chunk
    assert plain_elsewhere(qkv, plan) is None  # (the fused form is not a plain kernel)


def test_decode_keys_get_narrow_split_k_tiles_of_one_row_tile():
    dec = gemm_candidates(GemmKey(32, 768, 3072, "bias_residual", rows=True))
    assert all(c.tile_m == 64 for c in dec)  # the batch fits one 64-row tile
    assert {"64x16x64s6c1wsk8", "64x24x64s6c1wsk8"} <= {c.label() for c in dec}
    assert not any(c.tile_n < 48 for c in gemm_candidates(GemmKey(128, 768, 3072, "bias_residual")))  # prefill


def test_the_search_races_a_decode_gemm_against_the_plain_template_kernel_the_build_runs(tmp_path):
    """Where the database's norm + GEMV plan runs a decode GEMM in its plain kernel, that kernel is what a
    wgmma candidate must beat (not the partition kernel it replaced before)."""
    from gpt2_model.norm_gemv import NormGemvConfig, NormGemvKey  # pylint: disable=import-outside-toplevel
    from gpt2_model.norm_gemv_plan import NormGemvPlan  # pylint: disable=import-outside-toplevel
    from tuning.tasks import buffer_params  # pylint: disable=import-outside-toplevel
    from tuning.wgmma_tune import _replaced_kernels  # pylint: disable=import-outside-toplevel

    key = GemmKey(32, 768, 3072, "bias_residual", rows=True)
    nkey = NormGemvKey(batch=32, k=3072, n=768, epilogue="bias_residual", prologue="none")
    plan = NormGemvPlan({nkey.name(): NormGemvConfig(4, 2, mma=True, cluster=4)})
    got = _replaced_kernels(get_config("gpt2"), quantization="q0f16", target=CUDA, db_dir=tmp_path, keys=[key],
                            norm_gemv_plan=plan)
    assert list(got) == [key.name()] and len(got[key.name()]) == 1
    what, func = got[key.name()][0]
    assert what.startswith(f"gemv {nkey.name()}") and "cluster=4" in what
    assert [tuple(int(d) for d in shape) for _, shape, _ in buffer_params(func)] == \
        [(32, 1, 3072), (768, 3072), (768,), (32, 1, 768), (32, 1, 768)]  # x, W, bias, residual, out


def test_model_takes_a_decode_gemm_on_wgmma_before_the_plain_template_kernel():
    """Both plans name b32's GEMMs: the fused norm + QKV stays (the wgmma kernel has no norm), the three
    others run on wgmma, whose entries were stored only by beating the plain kernel."""
    from gpt2_model.norm_gemv import NormGemvConfig, NormGemvKey  # pylint: disable=import-outside-toplevel
    from gpt2_model.norm_gemv_plan import NormGemvPlan  # pylint: disable=import-outside-toplevel

    config = get_config("gpt2")
    d, inner = config.n_embd, config.n_inner
    nkeys = [NormGemvKey(32, d, 3 * d, "bias"), NormGemvKey(32, d, inner, "bias_gelu", prologue="none"),
             NormGemvKey(32, d, d, "bias_residual", prologue="none"),
             NormGemvKey(32, inner, d, "bias_residual", prologue="none")]
    ngv = NormGemvPlan({k.name(): NormGemvConfig(4, 1) if k.prologue == "norm" else
                        NormGemvConfig(8, 1, mma=True, cluster=4 if k.k == inner else 1) for k in nkeys})
    assert all(ngv.config_for(k) is not None for k in nkeys)
    gemm = GemmPlan({k.name(): parse_config("64x32x64s4c1wsk2") for k in gemm_keys(config, dtype="float16",
                                                                                     batches=[32])})
    ex = export_model(config, quantization="q0f16", target=CUDA, buckets={"decode": [32]}, gemm=gemm, norm_gemv=ngv)
    b32 = ex.mod["batch_decode_b32"].script()
    assert _wgmma_calls(ex.mod, "batch_decode_b32") == 3 * config.n_layer
    assert len(re.findall(r"call_tir\((?:cls\.)?norm_gemv_b32_k768_n2304_bias", b32)) == config.n_layer
    assert not re.search(r"call_tir\((?:cls\.)?gemv_b32", b32)  # no plain kernel left
    only_ngv = export_model(config, quantization="q0f16", target=CUDA, buckets={"decode": [32]}, norm_gemv=ngv)
    assert len(re.findall(r"call_tir\((?:cls\.)?gemv_b32", only_ngv.mod["batch_decode_b32"].script())) == \
        3 * config.n_layer  # without the wgmma plan: the plain kernels, as before


@needs_nvcc
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_every_epilogue_compiles_for_sm90a_without_spills(epilogue):
    from gpt2_model.wgmma_build import build, compile_cubin, cuda_source, ptxas_summary  # pylint: disable=import-outside-toplevel

    func = make_gemm(GemmKey(128, 768, 768, epilogue), parse_config("128x128x64s4c2ws"))
    src = cuda_source(build(func))
    assert "wgmma.mma_async" in src and "setmaxnreg" in src
    if epilogue == "bias_gelu":
        assert "tanhf" in src
    if epilogue == "bias_residual":
        assert "R2_ptr[" in src  # the residual is read in the epilogue
    _, log = compile_cubin(src)
    summary = ptxas_summary(log)
    assert summary.get("registers", 0) > 0 and summary.get("spill_bytes", 0) == 0, log


def test_a_gemm_kernel_is_made_once_per_process_and_named_per_call():
    from gpt2_model.wgmma_gemm import _gemm_func

    key, cfg = GemmKey(128, 2304, 768, "bias"), parse_config("64x48x64s8c1ws")
    before = _gemm_func.cache_info().hits
    a = make_gemm(key, cfg, name="qkv_a")
    b = make_gemm(key, cfg, name="qkv_b")
    assert _gemm_func.cache_info().hits >= before + 1
    assert (a.attrs["global_symbol"], b.attrs["global_symbol"]) == ("qkv_a", "qkv_b")
    assert tvm_ffi.structural_equal(a.with_attr("global_symbol", "x"), b.with_attr("global_symbol", "x"))
    assert not tvm_ffi.structural_equal(a, make_gemm(key, cfg, name="qkv_a", prefetch_w=True))


def test_split_k_configs_are_checked():
    k4 = parse_config("64x96x64s4c1wsk4")
    assert (k4.split, k4.label(), parse_config("64x96x64s4c1ws").split) == (4, "64x96x64s4c1wsk4", 1)
    assert config_problem(GemmKey(128, 768, 3072, "bias_residual"), k4) is None
    assert "does not split" in config_problem(GemmKey(128, 768, 192, "bias"), parse_config("64x96x64s4c1wsk4"))
    assert "register-split producer" in config_problem(GemmKey(128, 768, 3072, "bias"),
                                                       parse_config("128x128x64s4c2wsk2"))
    assert "split must be" in config_problem(GemmKey(128, 768, 3072, "bias"), parse_config("64x96x64s4c1wsk3"))
    # short chunks of the K = 3072 GEMM get split-K candidates (16 CTAs of 64 x 96 without)
    assert any(c.split > 1 for c in gemm_candidates(GemmKey(128, 768, 3072, "bias_residual")))


@needs_nvcc
@pytest.mark.parametrize("label", ["64x96x64s6c1ws", "64x64x64s4c1nowsk4"])
def test_decode_rows_compile_with_a_row_guard(label):
    """A decode batch of 32 rows in a 64-row tile: (32, 1, k) buffers, stores guarded by the row count."""
    from gpt2_model.wgmma_build import build, compile_cubin, cuda_source, ptxas_summary  # pylint: disable=import-outside-toplevel

    key = GemmKey(32, 768, 3072, "bias_residual", rows=True)
    src = cuda_source(build(make_gemm(key, parse_config(label), name="main")))
    assert re.search(r"< 32\)", src)  # rows 32..63 of the tile are never stored
    _, log = compile_cubin(src)
    summary = ptxas_summary(log)
    assert summary.get("registers", 0) > 0 and summary.get("spill_bytes", 0) == 0, log


@needs_nvcc
@pytest.mark.parametrize("label", ["64x96x64s4c1wsk4", "64x64x64s4c1nowsk4"])
def test_split_k_compiles_as_one_cluster_kernel_without_spills(label):
    """Split-K sums the cluster's accumulators through distributed shared memory: one kernel, a
    cluster launch, no workspace; it compiles for sm_90a without spills."""
    from gpt2_model.wgmma_build import build, compile_cubin, cuda_source, ptxas_summary  # pylint: disable=import-outside-toplevel

    key = GemmKey(128, 768, 3072, "bias_residual")
    exe = build(make_gemm(key, parse_config(label), name="main"))
    src = cuda_source(exe)
    assert src.count("__global__ void") == 2  # declaration + definition: one kernel
    assert "mapa.shared::cluster" in src and "barrier.cluster" in src and "cluster_ctarank" in src
    _, log = compile_cubin(src)
    summary = ptxas_summary(log)
    assert summary.get("registers", 0) > 0 and summary.get("spill_bytes", 0) == 0, log


@pytest.mark.parametrize("epilogue", ["bias", "bias_gelu", "bias_residual"])
def test_reference_form_equals_numpy(epilogue):
    """The TE form the CPU wiring test runs computes what the search checks candidates against."""
    from tuning.wgmma_tune import _inputs  # pylint: disable=import-outside-toplevel

    for key in (GemmKey(8, 24, 40, epilogue), GemmKey(5, 24, 40, epilogue, rows=True)):
        inp = _inputs(key)
        lib = tvm.compile(tvm.IRModule({"main": make_gemm_reference(key, name="main")}), target="llvm")
        names = ["a", "w", "bias"] + (["residual"] if epilogue == "bias_residual" else [])
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros(key.shape_out(), "float16"), dev)
        lib["main"](*[tvm.runtime.tensor(inp[n], dev) for n in names], out)
        want = reference_gemm(key, inp["a"], inp["w"], inp["bias"], inp["residual"]).astype(np.float32)
        np.testing.assert_allclose(out.numpy().astype(np.float32), want, rtol=2e-3, atol=2e-3)


def _wgmma_calls(mod, func: str) -> int:
    return len(re.findall(r"call_tir\((?:cls\.)?wgmma_", mod[func].script()))


def test_model_runs_the_planned_prefill_shapes_only():
    config = get_config("gpt2")
    plan = GemmPlan({k.name(): parse_config("64x64x64s6c1nows") for k in gemm_keys(config, dtype="float16",
                                                                                     lengths=[128])})
    ex = export_model(config, quantization="q0f16", target=CUDA, buckets={"prefill": [128, 256], "decode": [8]},
                      gemm=plan)
    assert _wgmma_calls(ex.mod, "prefill_s128") == 4 * config.n_layer
    assert _wgmma_calls(ex.mod, "prefill_tokens_s128") == 4 * config.n_layer
    for other in ("prefill_s256", "prefill", "batch_decode_b8", "batch_prefill"):
        assert _wgmma_calls(ex.mod, other) == 0, other
    dec = GemmPlan({k.name(): parse_config("64x64x64s6c1nows") for k in gemm_keys(config, dtype="float16",
                                                                                    batches=[32])})
    dex = export_model(config, quantization="q0f16", target=CUDA, buckets={"prefill": [128], "decode": [8, 32]},
                       gemm=dec)
    assert _wgmma_calls(dex.mod, "batch_decode_b32") == 4 * config.n_layer
    assert _wgmma_calls(dex.mod, "batch_decode_b8") == 0 and _wgmma_calls(dex.mod, "prefill_s128") == 0
    assert ex.metadata["wgmma_gemm"] == sorted(plan.configs)
    cpu = export_model(config, quantization="q0f16", target=make_target("cpu"), buckets={"prefill": [128]}, gemm=plan)
    assert _wgmma_calls(cpu.mod, "prefill_s128") == 0 and cpu.metadata["wgmma_gemm"] == []  # CUDA kernels only
    q4 = export_model(config, quantization="q4f16_1", target=CUDA, buckets={"prefill": [128]}, gemm=plan)
    assert _wgmma_calls(q4.mod, "prefill_s128") == 0  # quantized weights keep their own kernels


def test_planned_model_on_the_cpu_equals_hf(hf_sharded):
    """The wiring (which weight, bias and residual go where, the GELU) with the plain TE form in
    the kernel's place, built for the CPU: prompt logits of the planned chunk length equal HF's,
    q0f32, 1e-4 relative; an unplanned length runs the partition kernels and agrees as well."""
    from gpt2_model.loader import load_hf_params  # pylint: disable=import-outside-toplevel
    from gpt2_model.quantization import convert_params  # pylint: disable=import-outside-toplevel
    from gpt2_model.runtime import Engine  # pylint: disable=import-outside-toplevel
    from tuning.compile import build  # pylint: disable=import-outside-toplevel

    from ..conftest import hf_last_logits, rel_err  # pylint: disable=import-outside-toplevel

    path, hf = hf_sharded
    config = get_config(path)
    d, inner = config.n_embd, config.n_inner
    keys = [GemmKey(6, 3 * d, d, "bias", "float32"), GemmKey(6, d, d, "bias_residual", "float32"),
            GemmKey(6, inner, d, "bias_gelu", "float32"), GemmKey(6, d, inner, "bias_residual", "float32")]
    keys += [GemmKey(2, k.n, k.k, k.epilogue, "float32", rows=True) for k in keys]  # decode batches of 2
    plan = GemmPlan({k.name(): GemmConfig() for k in keys}, reference=True)
    target = make_target("cpu")
    exported = export_model(config, quantization="q0f32", target=target, buckets={"prefill": [6], "decode": [2]},
                            gemm=plan)
    assert _wgmma_calls(exported.mod, "prefill_s6") == 4 * config.n_layer
    assert _wgmma_calls(exported.mod, "batch_decode_b2") == 4 * config.n_layer
    engine = Engine(exported=exported, executable=build(exported, target=target),
                    params=convert_params(load_hf_params(path, config), exported.scheme), device="cpu")
    prompts = ([5, 17, 300, 2, 9, 40], [7, 1, 2])  # the planned chunk, then an unplanned length
    seqs = []
    for prompt in prompts:
        seqs.append(engine.add_sequence())
        assert rel_err(engine.prefill(seqs[-1], prompt), hf_last_logits(hf, prompt)) < 1e-4
    nxt = [11, 23]  # one decode step of the two (the b2 bucket: its GEMMs on the planned form)
    logits = engine.decode(seqs, nxt)
    for row, prompt, tok in zip(logits, prompts, nxt):
        assert rel_err(row, hf_last_logits(hf, prompt + [tok])) < 1e-4


@needs_nvcc
@pytest.mark.parametrize("pdl", ["0", "late"])
def test_mixed_build_for_sm90_compiles_with_the_scheduled_kernels(pdl, monkeypatch):
    """A model with real wgmma kernels next to dlight-scheduled ones lowers through the mixed TIR
    pipeline; its one CUDA module compiles for sm_90a. With ``GPT2K_PDL=late`` every kernel waits for
    its predecessor and then triggers its dependent: at its top, or (the wgmma kernels) after the L2
    prefetch of its weight tiles, through ``PDL_SYNC``."""
    from gpt2_model.wgmma_gemm import PDL_SYNC  # pylint: disable=import-outside-toplevel
    from gpt2_model.wgmma_build import compile_cubin  # pylint: disable=import-outside-toplevel
    from tuning.compile import build  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv("GPT2K_PDL", pdl)

    config = get_config("tiny")
    keys = gemm_keys(config, dtype="float16", lengths=[128])
    assert len(keys) == 4
    plan = GemmPlan({k.name(): parse_config("64x64x64s6c1nows") for k in keys}, prefetch_w=pdl == "late")
    exported = export_model(config, quantization="q0f16", target=CUDA, buckets={"prefill": [128]}, gemm=plan)
    exe = build(exported, target=CUDA)

    def walk(m):
        yield m
        for i in m.imports:
            yield from walk(i)

    cuda = [m for m in walk(exe.mod) if m.kind == "cuda"]
    assert len(cuda) == 1
    src = cuda[0].inspect_source()
    assert all(f"wgmma_{k.name()}_kernel" in src for k in keys) and "layer_norm" in src
    defs = list(re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\)\s*\{', src))
    assert len(defs) > 10
    for d, nxt in zip(defs, defs[1:] + [None]):
        kernel = src[d.end():nxt.start() if nxt else len(src)]
        body = kernel.lstrip()
        if d.group(1).startswith("wgmma_"):  # (under PDL) the prefetch of W's tiles, then the wait (a no-op without)
            assert "griddepcontrol" not in kernel and kernel.count(PDL_SYNC + "();") == 1
            assert kernel.index(PDL_SYNC) < kernel.index("cp_async_bulk_tensor")
            assert ("gpt2k_tma_prefetch_2d(" in kernel) == (pdl == "late")
            assert pdl != "late" or kernel.index("gpt2k_tma_prefetch_2d(") < kernel.index(PDL_SYNC)
        else:
            top = [s.strip() for s in body.split(";")[:2]]
            want = ["tvm_builtin_ptx_griddepcontrol_wait()", "tvm_builtin_ptx_griddepcontrol_launch_dependents()"]
            assert (top == want) == (pdl == "late"), kernel[:300]
    _, log = compile_cubin(src)
    assert "error" not in log.lower()


def test_plan_reading_skips_bad_entries(tmp_path, caplog, monkeypatch):
    good = GemmKey(512, 2304, 768, "bias")
    doc = {"kernels": {
        good.name(): {"key": {"m": 512, "n": 2304, "k": 768, "epilogue": "bias"},
                      "config": json.loads(json.dumps(parse_config("128x128x64s4c2ws").as_dict()))},
        "m512_n2300_k768_bias": {"key": {"m": 512, "n": 2300, "k": 768, "epilogue": "bias"},
                                 "config": GemmConfig().as_dict()},
        "m512_n768_k768_bias": {"key": {"m": 512, "n": 2304, "k": 768, "epilogue": "bias"},
                                "config": GemmConfig().as_dict()},
        "m512_n3072_k768_bias_gelu": {"config": {"tile_m": 128}, "key": {"m": 512}},
    }}
    (tmp_path / "wgmma_gemm.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        plan = read_gemm_plan(tmp_path)
    assert set(plan.configs) == {good.name()} and plan.config_for(good) == parse_config("128x128x64s4c2ws")
    assert "not multiples of the tile" in caplog.text and "holds the key of" in caplog.text
    monkeypatch.setenv("GPT2K_PDL", "0")
    assert gemm_plan_for(tmp_path, CUDA) == plan and not plan.prefetch_w
    monkeypatch.setenv("GPT2K_PDL", "late")  # a PDL build: the same choices, weights prefetched before the wait
    assert gemm_plan_for(tmp_path, CUDA).prefetch_w and gemm_plan_for(tmp_path, CUDA).configs == plan.configs
    monkeypatch.setenv("GPT2K_PDL", "0")
    assert gemm_plan_for(tmp_path, make_target("sm_80")) is None and gemm_plan_for(tmp_path, make_target("cpu")) is None
    assert read_gemm_plan(tmp_path / "missing") is None
    (tmp_path / "wgmma_gemm.json").write_text("{not json")
    with pytest.raises(ValueError, match="wgmma_gemm.json is not valid JSON"):
        read_gemm_plan(tmp_path)


@pytest.mark.gpu
def test_search_on_the_gpu_stores_checked_winners(tmp_path):
    from tuning.wgmma_tune import tune_wgmma_gemm  # pylint: disable=import-outside-toplevel

    dev = tvm.cuda(0)
    if not dev.exist or dev.compute_version != "9.0":
        pytest.skip("needs an sm_90 GPU (H100/H200)")
    doc = tune_wgmma_gemm(get_config("gpt2"), dtype="float16", target=CUDA, out_dir=tmp_path, lengths=[512],
                          number=20, repeat=2)
    found = {k: v for k, v in doc["kernels"].items()}
    # no database in tmp_path: the kernels to beat are dlight's; every stored winner was checked and beat them
    assert found, "at 512 rows the wgmma kernel beat no dlight GEMM"
    for entry in found.values():
        assert entry["rejected"] == 0 and 0 < entry["us"] < entry["unfused_us"]
        assert all(c.get("ok") for c in entry["candidates"] if "error" not in c), entry["candidates"]
    assert read_gemm_plan(tmp_path) is not None


def test_validate_builds_stored_choices_and_names_bad_ones(tmp_path):
    from tuning.validate import validate_wgmma  # pylint: disable=import-outside-toplevel

    assert validate_wgmma(tmp_path, target=CUDA) == (0, 0, [])  # no file: nothing to check
    doc = {"kernels": {
        "m512_n2304_k768_bias": {"key": {"m": 512, "n": 2304, "k": 768, "epilogue": "bias"},
                                 "config": parse_config("128x192x64s4c2ws").as_dict()},
        "m512_n2300_k768_bias": {"key": {"m": 512, "n": 2300, "k": 768, "epilogue": "bias"},
                                 "config": GemmConfig().as_dict()},
    }}
    (tmp_path / "wgmma_gemm.json").write_text(json.dumps(doc))
    entries, built, failures = validate_wgmma(tmp_path, target=CUDA)
    assert (entries, built) == (2, 1) and len(failures) == 1 and "m512_n2300_k768_bias" in failures[0]
    assert validate_wgmma(tmp_path, target=make_target("sm_80")) == (0, 0, [])  # other arches never use it


def test_compile_hook_sends_wgmma_source_to_sm90a(monkeypatch):
    """TVM compiles CUDA through ``tvm_callback_cuda_compile``: with the hook, source holding wgmma
    is compiled for sm_90a (whatever the sm_90 target or GPU says), any other source is left to TVM."""
    from tvm.support import nvcc  # pylint: disable=import-outside-toplevel

    from gpt2_model.wgmma_build import install_compile_hook  # pylint: disable=import-outside-toplevel

    install_compile_hook()
    seen = []
    monkeypatch.setattr(nvcc, "compile_cuda", lambda code, **kw: seen.append(kw) or bytearray(b"cubin"))
    callback = tvm.get_global_func("tvm_callback_cuda_compile")
    with make_target("sm_90"):
        assert bytes(callback('asm volatile("wgmma.fence.sync.aligned;");')) == b"cubin"
    assert seen and seen[0]["arch"] == "sm_90a"
    with make_target("sm_80"):  # not Hopper: TVM's own callback, which picks the arch itself
        callback('asm volatile("wgmma.fence.sync.aligned;");')
    with make_target("sm_90"):  # no wgmma in the source: TVM's own callback
        callback("extern \"C\" __global__ void k() {}")
    assert [kw.get("arch") for kw in seen] == ["sm_90a", None, None]
