"""The KV cache's prefill attention search (tuning.attention): reference, candidates, attention.json, apply."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import tvm
import tvm_ffi

from gpt2_model.config import GPT2Config
from gpt2_model.export import export_model
from tuning import attention as A
from tuning.targets import make_target

KEY = A.AttentionKey(h_kv=2, h_q=2, d=64, dtype="float16")


@pytest.fixture(scope="module")
def sm90():
    return make_target("sm_90")


def test_numpy_reference_matches_tvm_cpu_kernel():
    """The reference the GPU search checks candidates against agrees with TVM's own CPU kernel."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    key = A.AttentionKey(h_kv=2, h_q=2, d=16, dtype="float32")
    func = _attention_prefill_ragged_cpu(key.h_kv, key.h_q, key.d, key.d, key.dtype, {})
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    dev = tvm.cpu()
    args, q, k, v, sm_scale = A.ragged_prefill_args(key, 37, device=dev, seed=3)
    lib["main"](*args, 1, 0, 1.0, 1.0, sm_scale)
    ref = A.reference_causal_attention(q, k, v, sm_scale)
    np.testing.assert_allclose(args[7].numpy(), ref, rtol=1e-4, atol=1e-5)
    # causal: the first query row attends only to the first key, so its output is v[0]
    np.testing.assert_allclose(ref[0], v[0], rtol=1e-6)


def test_candidates_are_legal_and_start_with_tvms_choice(sm90):
    default = A.default_prefill_config(KEY, sm90)
    assert default == A.PrefillConfig(num_blks=16, tile_x=32, tile_z=32, num_warps=4, load_vec=4)
    cands = A.prefill_candidates(KEY, sm90)
    assert cands[0] == default and len(set(cands)) == len(cands) > 50
    assert all(A.is_legal(c, KEY, sm90) for c in cands)
    assert {c.num_blks for c in cands} >= {16, 64} and {c.load_vec for c in cands} == {4}
    assert {c.load_vec for c in A.prefill_candidates(KEY, sm90, load_vecs=(4, 8))} == {4, 8}
    # TVM's template with its own config, and through our patch, is the same kernel
    assert tvm_ffi.structural_equal(A.make_ragged_prefill(None, KEY, sm90), A.make_ragged_prefill(default, KEY, sm90))
    # a 3-row tile cannot be laid over 128 threads: refused with one clear error
    with pytest.raises(A.AttentionError, match="not legal"):
        A.make_ragged_prefill(A.PrefillConfig(16, 3, 32, 4, 4), KEY, sm90)
    # 64x64 tiles with fp32 softmax state exceed 48 KiB of static shared memory
    assert not A.is_legal(A.PrefillConfig(16, 64, 64, 4, 4), A.AttentionKey(2, 2, 128, "float32"), sm90)


def _gpt2_tiny():
    return GPT2Config(vocab_size=101, n_positions=64, n_embd=128, n_layer=1, n_head=2)


def _write(tmp_path, best, key=KEY):
    doc = {"kernels": [{"kernel": A.RAGGED_PREFILL, "key": asdict(key), "lengths": [64],
                        "default": {"config": asdict(A.PrefillConfig(16, 32, 32, 4, 4))},
                        "best": {"config": asdict(best)}}]}
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps(doc))


def test_apply_replaces_the_ragged_prefill_kernel(tmp_path, sm90):
    from tuning.pipeline import prepare

    ex = export_model(_gpt2_tiny(), quantization="q0f16", target=sm90)
    ex.mod = prepare(ex.mod, target=sm90)  # what compile applies it to (op_pattern attributes added)
    key = A.attention_key(_gpt2_tiny(), "float16")
    assert key == KEY
    best = A.PrefillConfig(num_blks=64, tile_x=16, tile_z=64, num_warps=4, load_vec=8)
    _write(tmp_path, best)
    before = ex.mod[A.RAGGED_PREFILL]
    mod, applied = A.apply_attention(ex.mod, tmp_path, key=key, target=sm90)
    assert len(applied) == 1 and "blks=64" in applied[0]
    assert tvm_ffi.structural_equal(mod[A.RAGGED_PREFILL].without_attr("op_pattern"),
                                    A.make_ragged_prefill(best, key, sm90))
    assert mod[A.RAGGED_PREFILL].attrs["op_pattern"] == before.attrs["op_pattern"]
    assert not tvm_ffi.structural_equal(mod[A.RAGGED_PREFILL], before)
    assert mod[A.RAGGED_PREFILL].attrs["global_symbol"] == before.attrs["global_symbol"]
    assert ex.mod[A.RAGGED_PREFILL].same_as(before)  # the caller's module is untouched
    # the replaced kernel uses the stored grid: 64 blocks along x
    assert 'thread="blockIdx.x"' in mod[A.RAGGED_PREFILL].script() and "T.thread_binding(64" in \
        mod[A.RAGGED_PREFILL].script()

    # another model's entry (other heads) is not applied
    _write(tmp_path, best, key=A.AttentionKey(h_kv=12, h_q=12, d=64, dtype="float16"))
    mod2, applied2 = A.apply_attention(ex.mod, tmp_path, key=key, target=sm90)
    assert applied2 == [] and mod2 is ex.mod
    # no file: nothing to do
    assert A.apply_attention(ex.mod, tmp_path / "none", key=key, target=sm90) == (ex.mod, [])


def test_corrupt_attention_file_is_one_clear_error(tmp_path, sm90):
    (tmp_path / A.ATTENTION_FILE).write_text('{"kernels": [{"kernel": "batch_prefill_ragged_kv"}]}')
    with pytest.raises(A.AttentionError, match="not a valid attention tuning file"):
        A.read_attention(tmp_path)
    (tmp_path / A.ATTENTION_FILE).write_text("{not json")
    with pytest.raises(A.AttentionError, match="re-run"):
        A.apply_attention(tvm.IRModule(), tmp_path, key=KEY, target=sm90)


@pytest.mark.slow  # CUDA build with nvcc, no GPU needed (~50 s on a loaded 2-core machine)
def test_a_candidate_builds_for_cuda(sm90):
    """The patched template compiles to CUDA here (nvcc, no GPU needed)."""
    cfg = A.PrefillConfig(num_blks=32, tile_x=16, tile_z=32, num_warps=4, load_vec=8)
    paths, errors = A._build_all([A.make_ragged_prefill(cfg, KEY, sm90)], sm90, workers=1)
    assert errors == [] and paths[0] is not None and paths[0].endswith(".tar")


def test_tune_attention_needs_a_local_gpu(tmp_path, sm90):
    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    with pytest.raises(A.AttentionError, match="local CUDA GPU"):
        A.tune_attention(_gpt2_tiny(), dtype="float16", target=sm90, out_dir=tmp_path, lengths=[64])
    assert not (tmp_path / A.ATTENTION_FILE).exists()


@pytest.mark.gpu
def test_tune_attention_on_gpu(tmp_path):
    """A small search on the card: the stored best is checked and never slower than TVM's."""
    from gpt2_model.device import detect_cuda_arch

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU")
    target = make_target(detect_cuda_arch())
    cands = [A.PrefillConfig(16, 32, 32, 4, 4), A.PrefillConfig(64, 16, 32, 4, 8), A.PrefillConfig(32, 32, 16, 8, 4)]
    doc = A.tune_attention(_gpt2_tiny(), dtype="float16", target=target, out_dir=tmp_path, lengths=[64, 256],
                           candidates=cands)
    entry = doc["kernels"][0]
    assert entry["best"]["total_us"] <= entry["default"]["total_us"]
    assert entry["best"]["max_abs_err"] <= entry["tolerance_abs"] <= 5e-2
    assert A.read_attention(tmp_path)["kernels"][0]["best"]["config"] == entry["best"]["config"]


@pytest.mark.slow  # two CUDA builds of the model with nvcc, no GPU needed (~50 s on a loaded 2-core machine)
def test_compile_with_a_database_applies_and_reports_the_attention_choice(tmp_path, sm90):
    """build_model with a database holding attention.json builds (nvcc, no GPU) and reports it."""
    from gpt2_model.config import get_config
    from tuning.compile import build_model
    from tuning.database import open_database, write_meta

    config = get_config("tiny-h64")
    write_meta(tmp_path, target=sm90, model="tiny-h64", quantization="q0f16")
    open_database(tmp_path, target=sm90, create=True)
    best = A.PrefillConfig(num_blks=64, tile_x=16, tile_z=64, num_warps=4, load_vec=4)
    _write(tmp_path, best, key=A.attention_key(config, "float16"))
    res = build_model(config, quantization="q0f16", target=sm90, database=tmp_path, buckets={})
    assert len(res.attention) == 1 and "blks=64 tile=16x64" in res.attention[0]
    untuned = build_model(config, quantization="q0f16", target=sm90, buckets={})
    assert untuned.attention == []


def test_search_check_covers_a_ragged_batch():
    """measure_ragged_prefill checks every candidate on a ragged batch of sequences too (not only one
    sequence per length): a kernel that treats the batch as one sequence passes the single-sequence
    lengths and fails there. TVM's own CPU kernel stands in for a candidate."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    from tuning.attention_measure import BATCH_CASE, measure_ragged_prefill

    key = A.AttentionKey(h_kv=2, h_q=2, d=16, dtype="float32")
    func = _attention_prefill_ragged_cpu(key.h_kv, key.h_q, key.d, key.d, key.dtype, {})
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm").mod
    dev = tvm.cpu()
    times, err = measure_ragged_prefill(lib, key, [8, 24], device=dev, number=1, repeat=1)
    assert set(times) == {8, 24} and all(t > 0 for t in times.values())
    assert err < 1e-4  # float32 kernel vs float32 NumPy, the ragged batch included
    assert len(BATCH_CASE) >= 3 and len(set(BATCH_CASE)) == len(BATCH_CASE)

    class OneSequence:  # runs the real kernel as if the whole batch were one sequence
        def __getitem__(self, name):
            def run(q, q_indptr, k, v, kv_indptr, *rest):
                n = q.shape[0]
                whole = tvm.runtime.tensor(np.array([0, n], np.int32), dev)
                offset = tvm.runtime.tensor(np.zeros(1, np.int32), dev)
                return lib[name](q, whole, k, v, whole, rest[0], offset, *rest[2:])
            return run

        def time_evaluator(self, *a, **kw):
            return lib.time_evaluator(*a, **kw)

    _, wrong = measure_ragged_prefill(OneSequence(), key, [8, 24], device=dev, number=1, repeat=1)
    assert wrong > 0.05

    class WritesNothing(OneSequence):  # leaves the outputs as they were: NaN before each checked call
        def __getitem__(self, name):
            return lambda *args: None

    _, nothing = measure_ragged_prefill(WritesNothing(), key, [8], device=dev, number=1, repeat=1)
    assert nothing == float("inf")  # not 0.0: NaN differences must not vanish in max()


def test_abs_error_treats_non_finite_results_as_infinitely_wrong():
    from tuning.attention_measure import abs_error

    ref = np.ones((3, 2), np.float32)
    assert abs_error(ref + 0.25, ref) == pytest.approx(0.25)
    for bad in (np.nan, np.inf, -np.inf):
        got = ref.copy()
        got[1, 1] = bad
        assert abs_error(got, ref) == float("inf")
