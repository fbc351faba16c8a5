"""The fused layer norm + decode GEMV kernel (``gpt2_model.norm_gemv``): its CUDA source run on the
CPU through ``cuda_emu`` against NumPy, the model's wiring (which pairs fuse, where), the
database file's reading, and (GPU-marked) the search on a real card."""

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
from gpt2_model.norm_gemv_plan import NormGemvPlan
from gpt2_model.norm_gemv import (NormGemvConfig, NormGemvError, NormGemvKey, is_norm_gemv_legal,
                                  make_norm_gemv, norm_gemv_candidates)
from tuning.norm_gemv_tune import ATOL, RTOL, _inputs, norm_gemv_keys, read_norm_gemv_plan, reference_norm_gemv
from tuning.targets import make_target

from .cuda_emu import emulate

CUDA = make_target("sm_90")

EMULATED = {
    # batch, n, epilogue, output dtype, warps, rows, mma: a ragged last block (n not a multiple of
    # the block's columns), more rows than warps (the norm loop), the fp32 lm_head form, one row;
    # tensor-core form: padded rows (3, 17), two 16-row tiles (17, 32), K split over 2-16 warps
    "b8_qkv_gelu": (8, 1000, "bias_gelu", "float16", 4, 2, False),
    "b3_lmhead_f32_ragged": (3, 1001, "none", "float32", 2, 4, False),
    "b1_bias": (1, 770, "bias", "float16", 8, 1, False),
    "b32_bias_rows2": (32, 96, "bias", "float16", 16, 2, False),
    "mma_b8_bias": (8, 256, "bias", "float16", 4, 2, True),
    "mma_b3_lmhead_f32_ragged": (3, 1001, "none", "float32", 2, 1, True),
    "mma_b32_gelu": (32, 100, "bias_gelu", "float16", 8, 4, True),
    "mma_b17_ksplit16": (17, 64, "bias", "float16", 16, 2, True),
    # the plain form (the c_proj layers): A fragments from the input rows, + bias + residual
    "mma_plain_b8_fc2": (8, 768, "bias_residual", "float16", 16, 2, True),
    "mma_plain_b20_ragged": (20, 100, "bias_residual", "float16", 4, 1, True),
    # the plain lm_head (after a standalone ln_f): no bias, fp32 logits, a ragged last block
    "mma_plain_lmhead_b16_f32_ragged": (16, 1001, "none", "float32", 4, 2, True),
    # the plain c_fc (after a standalone ln_2): + bias, GELU
    "mma_plain_gelu_b16": (16, 200, "bias_gelu", "float16", 8, 1, True),
    # wide: weight fragments by 16-byte loads, K permuted alike in the rows (from global or shared memory)
    "mma_plain_b8_fc2_wide": (8, 768, "bias_residual", "float16", 16, 2, True, True),
    "mma_b17_bias_wide_ragged": (17, 100, "bias", "float16", 4, 2, True, True),
    "mma_plain_lmhead_b3_f32_wide": (3, 1001, "none", "float32", 4, 2, True, True),
}


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
@pytest.mark.parametrize("case", sorted(EMULATED))
def test_emulated_kernel_matches_numpy(case, tmp_path):
    batch, n, epilogue, out_dtype, warps, rows, mma, *wide = EMULATED[case]
    plain = "plain" in case
    key = NormGemvKey(batch, 3072 if "fc2" in case else 768, n, epilogue, "float16", out_dtype,
                      prologue="none" if plain else "norm")
    cfg = NormGemvConfig(warps, rows, mma, wide=bool(wide))
    assert is_norm_gemv_legal(cfg, key), cfg
    with CUDA:
        lib = tvm.compile(tvm.IRModule({"main": make_norm_gemv(cfg, key, eps=1e-5)}), target=CUDA)
    launch = emulate(lib.mod.imports[0].inspect_source(), tmp_path)
    inp = _inputs(key, seed=3)
    out = np.full((batch, 1, n), np.nan, out_dtype)
    by_name = {"W_ptr": inp["w"], "beta_ptr": inp["beta"], "bias_ptr": inp["bias"], "res_ptr": inp["residual"],
               "gamma_ptr": inp["gamma"], "out_ptr": out, "x_ptr": inp["x"]}
    columns = rows * 8 if mma else warps * rows  # per block
    # (a 32-bit view of a buffer can become a second parameter of the kernel, ``x_ptr_1``: the same array)
    launch((-(-n // columns), 1), (32, warps), *[by_name[re.sub(r"_\d+$", "", name)] for _, name in launch.params])
    ref = reference_norm_gemv(key, inp["x"], inp["gamma"], inp["beta"], inp["w"], inp["bias"], eps=1e-5,
                              residual=inp["residual"])
    assert not np.isnan(out).any(), "a column was never written"
    excess = np.abs(out.astype(np.float32) - ref.astype(np.float32)) - RTOL * np.abs(ref.astype(np.float32))
    assert excess.max() <= ATOL, float(excess.max())
    # and the reference is what HF's order of operations gives: layer norm, then the linear layer
    import torch  # pylint: disable=import-outside-toplevel

    x = torch.tensor(inp["x"][:, 0].astype(np.float32))
    if not plain:
        x = torch.nn.functional.layer_norm(x, (768,), torch.tensor(inp["gamma"].astype(np.float32)),
                                           torch.tensor(inp["beta"].astype(np.float32)), 1e-5).half().float()
    y = x @ torch.tensor(inp["w"].astype(np.float32)).T
    if epilogue != "none":
        y = y + torch.tensor(inp["bias"].astype(np.float32))
    if epilogue == "bias_residual":
        y = y + torch.tensor(inp["residual"][:, 0].astype(np.float32))
    if epilogue == "bias_gelu":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    np.testing.assert_allclose(ref[:, 0].astype(np.float32), y.numpy(), rtol=1e-2, atol=2e-3)


def test_a_kernel_is_made_once_per_process_and_named_per_call():
    from gpt2_model.norm_gemv import _scheduled

    key, cfg = NormGemvKey(8, 768, 2304, "bias"), NormGemvConfig(8, 4, mma=True)
    before = _scheduled.cache_info().hits
    a = make_norm_gemv(cfg, key, eps=1e-5, name="qkv_a")
    b = make_norm_gemv(cfg, key, eps=1e-5, name="qkv_b")
    assert _scheduled.cache_info().hits >= before + 1  # (the second call parsed nothing)
    assert (a.attrs["global_symbol"], b.attrs["global_symbol"]) == ("qkv_a", "qkv_b")
    assert tvm_ffi.structural_equal(a.with_attr("global_symbol", "x"), b.with_attr("global_symbol", "x"))
    # another eps is another kernel
    c = make_norm_gemv(cfg, key, eps=1e-6, name="qkv_a")
    assert not tvm_ffi.structural_equal(a, c)


def test_candidates_made_in_worker_processes_equal_the_ones_made_here():
    from tuning.attention_build import PARALLEL_FROM, make_all

    keys = (NormGemvKey(8, 768, 3072, "bias_gelu"), NormGemvKey(16, 3072, 768, "bias_residual", prologue="none"))
    jobs = [(cfg, key) for key in keys for cfg in norm_gemv_candidates(key)][:PARALLEL_FROM]
    jobs.append((NormGemvConfig(3, 1, mma=True), keys[0]))  # 3 warps: not a legal configuration
    assert len(jobs) > PARALLEL_FROM  # (so the pool, not this process, makes them)
    made = make_all(make_norm_gemv, jobs, workers=2, eps=1e-5)
    assert len(made) == len(jobs)
    for (cfg, key), (func, err) in zip(jobs[:-1], made[:-1]):
        assert err is None, err
        assert tvm_ffi.structural_equal(func, make_norm_gemv(cfg, key, eps=1e-5)), cfg.label()
    func, err = made[-1]  # the failure comes back in its place, as the exception the maker raised
    assert func is None and isinstance(err, NormGemvError) and "not legal" in str(err)


def test_unsupported_keys_and_configs_are_one_clear_error():
    with pytest.raises(NormGemvError, match="batch 33"):
        make_norm_gemv(NormGemvConfig(4, 1), NormGemvKey(33, 768, 2304, "bias"), eps=1e-5)
    with pytest.raises(NormGemvError, match="epilogue 'relu'"):
        make_norm_gemv(NormGemvConfig(4, 1), NormGemvKey(8, 768, 2304, "relu"), eps=1e-5)
    with pytest.raises(NormGemvError, match="not a multiple of 256"):
        make_norm_gemv(NormGemvConfig(4, 1), NormGemvKey(8, 100, 2304, "bias"), eps=1e-5)
    with pytest.raises(NormGemvError, match="not legal"):  # 4 x 32 accumulators per thread
        make_norm_gemv(NormGemvConfig(4, 4), NormGemvKey(32, 768, 2304, "bias"), eps=1e-5)
    assert norm_gemv_candidates(NormGemvKey(8, 768, 2304, "bias", "float32")) == []  # fp16 only
    b32 = norm_gemv_candidates(NormGemvKey(32, 768, 2304, "bias"))
    assert all(c.rows * 32 <= 64 for c in b32 if not c.mma)
    mma = [c for c in b32 if c.mma]  # weight fragments <= 64 registers, partial sums fit the rows' space
    assert mma and all((48 // c.warps) * c.rows * 2 <= 64 and c.warps * 32 * c.rows * 8 * 4 <= 32 * 768 * 2 for c in mma)
    assert NormGemvConfig(4, 2, mma=True).label() == "norm_gemv mma ksplit=4 tiles=2"
    # 16-byte weight loads take 4 K steps' words at once: a warp's steps must be a multiple of 4
    wide = [c for c in b32 if c.wide]
    assert wide and all(c.mma and (48 // c.warps) % 4 == 0 for c in wide) and wide[0].label().endswith(" wide")
    assert not is_norm_gemv_legal(NormGemvConfig(8, 1, True, wide=True), NormGemvKey(32, 768, 2304, "bias"))


def test_search_keys_and_the_pairs_they_must_beat():
    """Each pair the search covers, and the two kernels of the tuned build it is timed against: the
    bucket's layer norm and its linear kernel, with the committed database's record where it has one."""
    from pathlib import Path  # pylint: disable=import-outside-toplevel

    from tuning.norm_gemv_tune import _unfused_kernels  # pylint: disable=import-outside-toplevel

    config = get_config("gpt2")
    keys = norm_gemv_keys(config, dtype="float16", batches=[1, 8, 64])
    kinds = [("bias", 2304), ("bias_gelu", 3072), ("none", 50257), ("bias_residual", 768), ("bias_residual", 768)]
    # from batch 8 also the plain lm_head (after a standalone ln_f); batch 64: more rows than the kernels take
    assert [(k.batch, k.epilogue, k.n) for k in keys] == [(b, e, n) for b in (1, 8) for e, n in kinds] + [
        (8, "none", 50257)]
    assert keys[2].out_dtype == "float32" and keys[-1].out_dtype == "float32"
    assert [(k.k, k.prologue) for k in keys[3:5]] == [(768, "none"), (3072, "none")]  # the two c_proj layers
    assert keys[-1].prologue == "none" and keys[-1].name() == "b8_k768_n50257_none_plain"
    # from batch 16 the plain QKV and c_fc too (after ln_1 / ln_2 alone)
    k16 = norm_gemv_keys(config, dtype="float16", batches=[16])
    assert [(k.epilogue, k.n, k.prologue) for k in k16[5:]] == [
        ("none", 50257, "none"), ("bias", 2304, "none"), ("bias_gelu", 3072, "none")]
    db = Path(__file__).resolve().parents[2] / "databases" / "sm_90" / "gpt2-q0f16"
    pairs = _unfused_kernels(config, quantization="q0f16", target=CUDA, db_dir=db, keys=keys[5:])
    assert set(pairs) == {k.name() for k in keys[5:]}
    for key in keys[5:]:
        kernels = pairs[key.name()]
        assert len(kernels) == (2 if key.prologue == "norm" else 1)
        if key.prologue == "norm":
            assert kernels[0][0].startswith("norm layer_norm"), kernels[0][0]
        linear, linear_f = kernels[-1]
        assert linear.startswith("linear fused_NT_matmul") and "(tuned)" in linear, linear  # b8 records committed
        assert linear_f.attrs  # a scheduled PrimFunc, ready to build


def _plan(batch=8):
    config = get_config("gpt2")
    keys = [NormGemvKey(batch, 768, 2304, "bias"), NormGemvKey(batch, 768, config.n_inner, "bias_gelu"),
            NormGemvKey(batch, 768, config.vocab_size, "none", out_dtype="float32")]
    return NormGemvPlan({k.name(): NormGemvConfig(4, 1) for k in keys})


def _calls(mod, func: str) -> tuple[int, int]:
    text = mod[func].script()
    return len(re.findall(r"call_tir\((?:cls\.)?norm_gemv_", text)), text.count("R.nn.layer_norm(")


def test_model_fuses_every_norm_of_the_planned_decode_shapes_only():
    ex = export_model(get_config("gpt2"), quantization="q0f16", target=CUDA, buckets={"decode": [8, 4], "prefill": [16]},
                      norm_gemv=_plan())
    assert _calls(ex.mod, "batch_decode_b8") == (25, 0)  # ln_1 + QKV, ln_2 + c_fc, ln_f + lm_head: 12 + 12 + 1
    assert _calls(ex.mod, "batch_decode_tokens_b8") == (25, 0)
    for unplanned in ("batch_decode_b4", "batch_decode", "prefill_s16", "prefill", "decode"):
        fused, norms = _calls(ex.mod, unplanned)
        assert fused == 0 and norms > 0, unplanned
    assert len(ex.metadata["norm_gemv"]) == 3


def test_no_fusion_off_cuda_or_for_quantized_weights():
    cpu = export_model(get_config("tiny-h64"), quantization="q0f16", target=make_target("cpu"), buckets={"decode": [8]},
                       norm_gemv=_plan())
    assert cpu.metadata["norm_gemv"] == [] and "norm_gemv_" not in cpu.mod.script()
    q4 = export_model(get_config("gpt2"), quantization="q4f16_1", target=CUDA, buckets={"decode": [8]}, norm_gemv=_plan())
    assert _calls(q4.mod, "batch_decode_b8")[0] == 0


def test_database_file_becomes_the_plan(tmp_path, caplog):
    assert read_norm_gemv_plan(tmp_path) is None  # no file: the unfused model
    doc = {"schema": "gpt2k-norm-gemv/1", "kernels": {
        "b8_k768_n2304_bias": {"config": {"warps": 8, "rows": 2}, "us": 3.0},
        "b8_k768_n3072_bias_gelu": {"config": {"warps": "x"}},  # malformed: skipped, that pair stays unfused
        "b32_k768_n2304_bias": {"key": {"batch": 32, "k": 768, "n": 2304, "epilogue": "bias"},
                                "config": {"warps": 4, "rows": 4}},  # 4 x 32 accumulators: not legal
    }}
    (tmp_path / "norm_gemv.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        plan = read_norm_gemv_plan(tmp_path)
    assert plan.config_for(NormGemvKey(8, 768, 2304, "bias")) == NormGemvConfig(8, 2)
    assert plan.config_for(NormGemvKey(8, 768, 3072, "bias_gelu")) is None
    assert set(plan.configs) == {"b8_k768_n2304_bias"}
    assert "b8_k768_n3072_bias_gelu skipped" in caplog.text and "not a legal configuration" in caplog.text
    (tmp_path / "norm_gemv.json").write_text("{not json")
    with pytest.raises(ValueError, match="norm_gemv.json is not valid JSON"):
        read_norm_gemv_plan(tmp_path)


@pytest.mark.gpu
def test_search_on_the_gpu_stores_checked_winners(tmp_path):
    from tuning.norm_gemv_tune import tune_norm_gemv  # pylint: disable=import-outside-toplevel

    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("needs a CUDA GPU")
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel

    doc = tune_norm_gemv(get_config("gpt2"), dtype="float16", target=make_target(detect_cuda_arch()),
                         out_dir=tmp_path, batches=[2], number=20, repeat=2)
    # no database in tmp_path: the pairs to beat are dlight's; every stored winner was checked and beat them
    assert doc["kernels"], "at batch 2 the fused kernel beat no pair"
    for entry in doc["kernels"].values():
        assert entry["rejected"] == 0 and 0 < entry["us"] < entry["unfused_us"]
        assert all(c.get("ok") for c in entry["candidates"]), entry["candidates"]
    assert read_norm_gemv_plan(tmp_path) is not None


def test_fused_model_on_the_cpu_equals_hf(hf_sharded):
    """The fused call's wiring (ln_1 + c_attn, ln_2 + c_fc + GELU, ln_f + tied lm_head; which weight
    and bias goes where) in the plain form, built for the CPU: prompt logits (the last position's
    norm + lm_head: the b1 pair) and decode logits of the fused b2 bucket and of one sequence equal
    HF's, q0f32, 1e-4 relative."""
    from gpt2_model.loader import load_hf_params  # pylint: disable=import-outside-toplevel
    from gpt2_model.quantization import convert_params  # pylint: disable=import-outside-toplevel
    from gpt2_model.runtime import Engine  # pylint: disable=import-outside-toplevel
    from tuning.compile import build  # pylint: disable=import-outside-toplevel

    from ..conftest import hf_last_logits, rel_err  # pylint: disable=import-outside-toplevel

    path, hf = hf_sharded
    config = get_config(path)
    keys = [NormGemvKey(b, config.n_embd, n, e, "float32", "float32") for b in (1, 2)
            for n, e in ((3 * config.n_embd, "bias"), (config.n_inner, "bias_gelu"), (config.vocab_size, "none"))
            if (b, e) not in ((2, "none"), (2, "bias_gelu"))]
    keys += [NormGemvKey(b, k, config.n_embd, "bias_residual", "float32", "float32", prologue="none")
             for b in (1, 2) for k in (config.n_embd, config.n_inner)]  # the two c_proj layers + residual
    # at b2 the lm_head and c_fc are the plain form, after the standalone ln_f / ln_2
    keys.append(NormGemvKey(2, config.n_embd, config.vocab_size, "none", "float32", "float32", prologue="none"))
    keys.append(NormGemvKey(2, config.n_embd, config.n_inner, "bias_gelu", "float32", "float32", prologue="none"))
    plan = NormGemvPlan({k.name(): NormGemvConfig(1, 1) for k in keys}, reference=True)
    target = make_target("cpu")
    exported = export_model(config, quantization="q0f32", target=target, buckets={"decode": [2]}, norm_gemv=plan)
    # every norm fused but ln_f and ln_2, which run alone before the plain lm_head and c_fc
    assert _calls(exported.mod, "batch_decode_b2")[1] == 1 + config.n_layer and _calls(exported.mod, "batch_decode_b2")[0] > 0
    b2 = exported.mod["batch_decode_b2"].script()
    assert b2.count("call_tir(cls.gemv_") + b2.count("call_tir(gemv_") == 3 * config.n_layer + 1
    assert b2.count("gemv_b2_k{}_n{}_none_plain".format(config.n_embd, config.vocab_size)) == 1
    engine = Engine(exported=exported, executable=build(exported, target=target),
                    params=convert_params(load_hf_params(path, config), exported.scheme), device="cpu")
    prompts = [[5, 17, 300, 2], [7, 1, 2]]
    seqs = [engine.add_sequence() for _ in prompts]
    for s, p in zip(seqs, prompts):  # prefill: ln_f + lm_head of the last position is the fused b1 pair
        assert rel_err(engine.prefill(s, p), hf_last_logits(hf, p)) < 1e-4
    nxt = [11, 400]
    logits = engine.decode(seqs, nxt)  # the b2 bucket: fused
    for row, p, t in zip(logits, prompts, nxt):
        assert rel_err(row, hf_last_logits(hf, p + [t])) < 1e-4
    one = engine.decode([seqs[0]], [3])[0]  # one sequence: the fused b1 pairs
    assert rel_err(one, hf_last_logits(hf, prompts[0] + [11, 3])) < 1e-4


def test_validate_builds_stored_choices_and_names_bad_ones(tmp_path):
    from tuning.validate import validate_norm_gemv  # pylint: disable=import-outside-toplevel

    assert validate_norm_gemv(tmp_path, target=CUDA) == (0, 0, [])  # no file: nothing to check
    good = NormGemvKey(1, 768, 2304, "bias")
    doc = {"eps": 1e-5, "kernels": {
        good.name(): {"key": {"batch": 1, "k": 768, "n": 2304, "epilogue": "bias", "dtype": "float16",
                              "out_dtype": "float16"}, "config": {"warps": 8, "rows": 2}},
        "b64_k768_n2304_bias": {"key": {"batch": 64, "k": 768, "n": 2304, "epilogue": "bias"},
                                "config": {"warps": 8, "rows": 1}},
        "b1_k768_n768_bias": {"key": {"batch": 1, "k": 768, "n": 2304, "epilogue": "bias"},
                              "config": {"warps": 8, "rows": 1}},
    }}
    (tmp_path / "norm_gemv.json").write_text(json.dumps(doc))
    entries, built, failures = validate_norm_gemv(tmp_path, target=CUDA)
    assert (entries, built) == (3, 1)
    assert len(failures) == 2 and "batch 64" in " ".join(failures) and "holds the key of" in " ".join(failures)
    assert validate_norm_gemv(tmp_path, target=make_target("cpu")) == (0, 0, [])  # CPU builds never fuse


def test_search_keeps_only_checked_winners_over_the_kernels_they_replace():
    from tuning.norm_gemv_tune import merge_winners  # pylint: disable=import-outside-toplevel

    def cand(us, ok=True, warps=4):
        return {"config": {"warps": warps, "rows": 1, "mma": True}, "ok": ok, **({"us": us} if ok else {})}

    stored = {"old_not_searched": {"config": {"warps": 2, "rows": 1}},
              "stale": {"config": {"warps": 8, "rows": 1}}, "all_fail": {"config": {"warps": 8, "rows": 1}}}
    found = {
        "wins": {"key": {}, "candidates": [cand(5.0), cand(3.0, warps=8), cand(1.0, ok=False)]},  # the failed one is never picked
        "stale": {"key": {}, "candidates": [cand(9.0)]},  # slower than the pair now: the stored entry goes
        "all_fail": {"key": {}, "candidates": [cand(0, ok=False)]},
        "untimed": {"key": {}, "candidates": [cand(2.0)]},
    }
    base = {"wins": {"norm": 1.5, "linear": 2.0}, "stale": {"linear": 4.0}, "all_fail": {"linear": 4.0},
            "untimed": {"linear": None}}
    lines = []
    out = merge_winners(stored, found, base, log=lines.append)
    assert set(out) == {"old_not_searched", "wins"}
    assert out["wins"]["config"]["warps"] == 8 and out["wins"]["us"] == 3.0 and out["wins"]["unfused_us"] == 3.5
    assert out["wins"]["rejected"] == 1
    text = "\n".join(lines)
    assert "stale: best" in text and "not faster" in text and "untimed" in text and "were not timed" in text


def test_the_search_keeps_the_faster_form_of_a_pair():
    """Both lm_head forms stored for a batch: the fused ln_f + lm_head is weighed against the plain
    one plus the standalone ln_f (timed with the fused entry's pair); the loser's entry goes."""
    from tuning.norm_gemv_tune import pick_plain  # pylint: disable=import-outside-toplevel

    def entry(us, norm_us=None):
        pair = {"linear lm_head (tuned)": 30.0} | ({"norm layer_norm (tuned)": norm_us} if norm_us else {})
        return {"config": {"warps": 4, "rows": 1, "mma": True}, "us": us, "unfused": pair}

    lines = []
    kernels = {"b32_k768_n50257_none": entry(60.0, norm_us=3.0), "b32_k768_n50257_none_plain": entry(25.0),
               "b8_k768_n50257_none": entry(27.0, norm_us=2.5), "b8_k768_n50257_none_plain": entry(25.0),
               "b1_k768_n50257_none": entry(20.0, norm_us=2.0), "b16_k768_n50257_none_plain": entry(24.0)}
    out = pick_plain(kernels, log=lines.append)
    # b32: 25 + 3 < 60, the plain form wins; b8: 25 + 2.5 > 27, the fused stays; single forms stay
    assert set(out) == {"b32_k768_n50257_none_plain", "b8_k768_n50257_none", "b1_k768_n50257_none",
                        "b16_k768_n50257_none_plain"}
    assert len(lines) == 2 and "fused entry dropped" in lines[0] and "plain entry dropped" in lines[1]
    # any norm + linear pair the same way; a plain c_proj (no fused form) always stays
    out = pick_plain({"b16_k768_n2304_bias": entry(9.0, norm_us=2.0), "b16_k768_n2304_bias_plain": entry(5.0),
                      "b16_k768_n768_bias_residual_plain": entry(4.0)}, log=lines.append)
    assert set(out) == {"b16_k768_n2304_bias_plain", "b16_k768_n768_bias_residual_plain"}
    # the fused form's ln_f time unknown: the fused form stays
    out = pick_plain({"b32_k768_n50257_none": entry(60.0), "b32_k768_n50257_none_plain": entry(25.0)}, log=lines.append)
    assert set(out) == {"b32_k768_n50257_none"} and "untimed" in lines[-1]


def test_cluster_split_is_the_plain_forms_and_sm90s_only():
    """The plain tensor-core form's cluster split: legal without the norm only, K divisible by the
    warps of every CTA of the cluster; offered for sm_90 searches; its kernel syncs the cluster and
    reads the other CTAs' sums through distributed shared memory, and column block bx // C of the
    grid's x is where it writes (its numerics are checked on the card by the search)."""
    fc2 = NormGemvKey(32, 3072, 768, "bias_residual", prologue="none")
    qkv = NormGemvKey(32, 768, 2304, "bias")
    assert NormGemvConfig(8, 1, True, 4).label() == "norm_gemv mma ksplit=8 tiles=1 cluster=4"

    assert is_norm_gemv_legal(NormGemvConfig(8, 1, True, 4), fc2)
    assert not is_norm_gemv_legal(NormGemvConfig(8, 1, True, 4), qkv)  # the norm needs whole rows
    assert not is_norm_gemv_legal(NormGemvConfig(16, 1, True, 4), NormGemvKey(8, 768, 768, "bias_residual",
                                                                              prologue="none"))  # 48 K steps / 64
    assert not is_norm_gemv_legal(NormGemvConfig(8, 1, False, 2), NormGemvKey(8, 768, 2304, "bias"))
    assert {c.cluster for c in norm_gemv_candidates(fc2)} == {1}
    split = [c for c in norm_gemv_candidates(fc2, clusters=(1, 2, 4)) if c.cluster > 1]
    assert split and all(c.mma for c in split) and {c.cluster for c in split} == {2, 4}
    # (only where the blocks are few: not for the lm_head's 50257 columns)
    lm = NormGemvKey(32, 768, 50257, "none", out_dtype="float32", prologue="none")
    assert all(c.cluster == 1 for c in norm_gemv_candidates(lm, clusters=(1, 2, 4)))
    assert all(c.cluster == 1 for c in norm_gemv_candidates(qkv, clusters=(1, 2, 4)))
    with CUDA:
        lib = tvm.compile(tvm.IRModule({"main": make_norm_gemv(NormGemvConfig(8, 1, True, 4), fc2, eps=1e-5)}),
                          target=CUDA)
    src = lib.mod.imports[0].inspect_source()
    assert src.count("tvm_builtin_cuda_cluster_sync();") == 2 and "ld.shared::cluster.f32" in src
    assert "((int)blockIdx.x) >> 2" in src and "tvm_builtin_cluster_ctaid_x()" in src
