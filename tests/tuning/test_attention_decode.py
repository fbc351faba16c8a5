"""The decode attention template (tuning.attention_decode): signature, candidates, lowering, NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
import tvm_ffi

from tuning import attention_decode as D
from tuning import attention_decode_tune as DT
from tuning.attention import AttentionKey
from tuning.targets import make_target

GPT2 = AttentionKey(h_kv=12, h_q=12, d=64, dtype="float16")


@pytest.fixture(scope="module")
def sm90():
    return make_target("sm_90")


def _lower(func, target):
    """The TIR pipeline of ``tvm.tirx.build`` up to the finalized host/device modules (no nvcc)."""
    from tvm.tirx.build import split_host_device_mods  # pylint: disable=import-outside-toplevel

    from tuning.builder import build_config  # pylint: disable=import-outside-toplevel

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with tvm.transform.PassContext(opt_level=3, config=build_config(target)):
        mod = tvm.tirx.transform.BindTarget(target.with_host(target.host))(mod)
        pipeline, fin_host, fin_dev = tvm.tirx.get_default_tir_pipeline(target)
        mod = pipeline(mod)
        host, devices = split_host_device_mods(mod)
        return fin_host()(host), {t: fin_dev()(m) for t, m in devices.items()}


def test_signature_matches_tvms_kernel(sm90):
    """Same 13 parameters (names, dtypes), same buffer shapes/dtypes, same symbol and attributes:
    the KV cache's call site works unchanged."""
    tvm_f = D.make_decode_kernel(None, GPT2, sm90)
    ours = D.make_decode_kernel(D.DecodeConfig(groups=8, tokens=2), GPT2, sm90)
    assert len(ours.params) == len(tvm_f.params) == 13
    assert [p.name for p in ours.params] == [p.name for p in tvm_f.params]
    assert [str(p.ty) for p in ours.params] == [str(p.ty) for p in tvm_f.params]
    # the printed signature holds every buffer's shape, dtype, offset variable and offset factor
    sig = lambda f: next(ln for ln in f.script().splitlines() if ln.startswith("def "))  # noqa: E731
    assert sig(ours) == sig(tvm_f)
    assert "elem_offset=pages_elem_offset" in sig(ours) and "length_info: T.Buffer((B,)" in sig(ours)
    assert dict(ours.attrs) == dict(tvm_f.attrs)
    assert ours.attrs["global_symbol"] == D.DECODE_KERNEL


def test_candidates_and_legality(sm90):
    cands = D.decode_candidates(GPT2, sm90)
    one = [c for c in cands[1:] if c.split == 1]
    split = [c for c in cands[1:] if c.split > 1]
    assert cands[0] is None and len(one) == 2 * 5 * 4 + 5 * 3 + 2 * 3 * 2 and len(split) == 2 * 2 * len(D.SPLIT_SHAPES)
    # 8-byte loads (16 lanes a 64-wide row) and 16-byte ones (8 lanes: half the threads per group),
    # software-pipelined 8-byte ones where an iteration takes 1-4 tokens a group, and L2-prefetching
    # ones of both widths (groups 8-32 x 2-4 tokens)
    assert sum(c.wide for c in one) == 20 + 6 and not any(c.wide for c in split) and "wide" in one[39].label()
    l2 = [c for c in one if c.l2]
    assert len(l2) == 12 and all(8 <= c.groups <= 32 and not c.prefetch for c in l2) and "l2" in l2[0].label()
    assert not any(c.l2 for c in split) and not D.is_decode_legal(D.DecodeConfig(16, 4, 2, l2=True), GPT2, sm90)
    pre = [c for c in one if c.prefetch]
    assert len(pre) == 15 and all(c.tokens <= 4 and not c.wide for c in pre) and "prefetch" in pre[0].label()
    assert D._vec_lanes(GPT2, True) == (8, 8) and D._vec_lanes(GPT2) == (4, 16)
    assert {c.split_below for c in split} == {0, D.SPLIT_BELOW} and "below 132 blocks" in split[-1].label()
    assert not D.is_decode_legal(D.DecodeConfig(16, 4, 1, 132), GPT2, sm90)  # a threshold without a split
    assert all(D.is_decode_legal(c, GPT2, sm90) for c in cands[1:])
    assert {c.groups for c in one} == {4, 8, 16, 32, 64} and {c.tokens for c in one} == {1, 2, 4, 8}
    assert {c.split for c in split} == {2, 4} and "split=4" in split[-1].label() and "split" not in one[0].label()
    # a cluster split needs sm_90 (clusters, distributed shared memory): none below, nor off CUDA
    sm86 = make_target("sm_86")
    assert all(c.split == 1 and not c.l2 for c in D.decode_candidates(GPT2, sm86)[1:])  # (l2: PDL's, sm_90+)
    assert not D.is_decode_legal(D.DecodeConfig(16, 4, 4), GPT2, sm86)
    assert not D.is_decode_legal(D.DecodeConfig(16, 4, 4), GPT2, None)
    assert not D.is_decode_legal(D.DecodeConfig(16, 4, 3), GPT2, sm90)  # clusters of 2, 4 or 8
    # an attention.json entry written before the split knob loads as an unsplit configuration
    assert D.DecodeConfig(**{"groups": 16, "tokens": 4}) == D.DecodeConfig(16, 4, 1)
    # 64 groups of 16 lanes = 1024 threads; 128 groups would be 2048
    assert not D.is_decode_legal(D.DecodeConfig(128, 1), GPT2, sm90)
    assert not D.is_decode_legal(D.DecodeConfig(12, 1), GPT2, sm90)  # not a power of two: tree merge
    assert not D.is_decode_legal(D.DecodeConfig(8, 3), GPT2, sm90)  # 3 does not divide the page
    # fp32, d=64: 8-byte loads are 2 elements, 32 lanes per token
    f32 = AttentionKey(12, 12, 64, "float32")
    assert D.is_decode_legal(D.DecodeConfig(32, 1), f32, sm90) and not D.is_decode_legal(D.DecodeConfig(64, 1), f32, sm90)
    # d=256 fp16: 64 lanes do not fit a warp's butterfly
    assert not D.is_decode_legal(D.DecodeConfig(4, 1), AttentionKey(4, 4, 256, "float16"), sm90)
    # grouped-query: only TVM's kernel, and the template refuses with one clear error
    gqa = AttentionKey(2, 4, 64, "float16")
    assert D.decode_candidates(gqa, sm90) == [None]
    with pytest.raises(D.DecodeError, match="grouped-query"):
        D.make_decode_kernel(D.DecodeConfig(8, 2), gqa, sm90)
    with pytest.raises(D.DecodeError, match="not legal"):
        D.make_decode_kernel(D.DecodeConfig(8, 3), GPT2, sm90)
    # TVM's kernel through the template entry point is TVM's own
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode

    assert tvm_ffi.structural_equal(D.make_decode_kernel(None, GPT2, sm90),
                                    _attention_decode(12, 12, 64, "float16", False, {}, sm90))


def test_every_candidate_lowers_for_sm90(sm90):
    """Every candidate passes TVM's whole TIR pipeline for CUDA (sync planning, vector loads...);
    the nvcc build is the slow test below."""
    for cfg in D.decode_candidates(GPT2, sm90)[1:]:
        host, devices = _lower(D.make_decode_kernel(cfg, GPT2, sm90), sm90)
        (dev_mod,) = devices.values()
        (kernel,) = dev_mod.functions.values()
        text = kernel.script()
        assert "tvm_warp_shuffle_xor" in text or "shfl" in text, cfg
        # page loads are 8-byte vectors (T.Ramp of 4 fp16; wide: 16-byte, of 8), not scalar loads
        # (the pages' view starts at the offset floored to a whole vector: >> 2 for 4 fp16, >> 3 for 8)
        assert "T.Ramp" in text and f"pages_elem_offset >> T.int64({3 if cfg.wide else 2})" in text, cfg
        assert "rotary_mode must be 0" in host.script() and f"{16 if cfg.wide else 8}-byte aligned" in host.script()
        # a pipelined candidate keeps the next iteration's K/V in a second set of registers
        assert ("k_nx" in text) == cfg.prefetch, cfg
        # a split runs as a cluster (the launch's clusterCtaIdx tag) merged through distributed shared memory
        assert ("clusterCtaIdx.x" in text and "tvm_dsmem_ld_f32" in text) == (cfg.split > 1), cfg
        # the adaptive split: the host sizes the grid and the cluster from the batch (12 heads: split below 11)
        assert ("T.if_then_else(B < 11, 4, 1)" in host.script()) == (cfg.split == 4 and cfg.split_below == 132), cfg


@pytest.mark.slow  # nvcc builds of the 83 candidates (~2-5 min on a loaded 2-core machine)
def test_every_candidate_builds_for_cuda(sm90):
    from tuning.attention import _build_all

    cands = D.decode_candidates(GPT2, sm90)
    paths, errors = _build_all([D.make_decode_kernel(c, GPT2, sm90) for c in cands], sm90, workers=2)
    assert errors == [] and all(p is not None for p in paths)


# ------------------------------------------------------------------------------------------------
# NumPy reference
# ------------------------------------------------------------------------------------------------


def _naive(q, pages, indptr, values, last, sm_scale):
    """Token by token: gather K/V rows through the page table, softmax in float64, base-2 lse."""
    batch, h_q, d = q.shape
    group = h_q // pages.shape[2]
    out = np.zeros((batch, h_q, d))
    lse = np.full((batch, h_q), -5e4)
    for b in range(batch):
        npg = indptr[b + 1] - indptr[b]
        if npg == 0:
            continue
        n = (npg - 1) * 16 + last[b]
        for h in range(h_q):
            ks, vs = [], []
            for t in range(n):
                page = values[indptr[b] + t // 16]
                ks.append(pages[page, 0, h // group, t % 16].astype(np.float64))
                vs.append(pages[page, 1, h // group, t % 16].astype(np.float64))
            s = np.array([q[b, h].astype(np.float64) @ k for k in ks]) * sm_scale
            w = np.exp(s - s.max())
            out[b, h] = (w[:, None] * np.array(vs)).sum(0) / w.sum()
            lse[b, h] = math.log2(np.exp(s).sum())
    return out, lse


@pytest.mark.parametrize("key", [AttentionKey(3, 3, 16, "float16"), AttentionKey(2, 4, 8, "float32")])
def test_reference_matches_naive_attention(key):
    # 1 token, a full page, a partial last page, several pages, no pages at all
    lens = [1, 16, 37, 50, 0, 129]
    inp = D.paged_decode_args(key, lens, device=None, seed=5)
    assert inp.args == []
    assert np.isnan(inp.pages).any()  # the slots no sequence owns are poisoned
    out, lse = inp.reference()
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    n_out, n_lse = _naive(inp.q, inp.pages, inp.indptr, inp.values, inp.last_page_len, inp.sm_scale)
    np.testing.assert_allclose(out, n_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-6, atol=1e-5)
    # the layout the kernel sees: context (pages - 1) * 16 + last_page_len, pages in table order
    assert list(np.diff(inp.indptr)) == [1, 1, 3, 4, 0, 9]
    assert list(inp.last_page_len) == [1, 16, 5, 2, 0, 1]
    # 1 token: the output is that token's V row, lse its scaled score
    p0 = inp.values[inp.indptr[0]]
    np.testing.assert_allclose(out[0], np.repeat(inp.pages[p0, 1, :, 0], key.h_q // key.h_kv, axis=0), rtol=1e-6)
    s0 = (inp.q[0].astype(np.float64) * np.repeat(inp.pages[p0, 0, :, 0], key.h_q // key.h_kv, axis=0)).sum(-1)
    np.testing.assert_allclose(lse[0], s0 * inp.sm_scale / math.log(2), rtol=1e-5, atol=1e-5)
    # no pages: TVM's empty state
    assert (out[4] == 0).all() and (lse[4] == -5e4).all()


def test_reference_ignores_what_unused_slots_hold():
    key = AttentionKey(2, 2, 8, "float16")
    a = D.paged_decode_args(key, [21, 3], device=None, seed=1, poison=True)
    b = D.paged_decode_args(key, [21, 3], device=None, seed=1, poison=False)
    assert np.isnan(a.pages).any() and not np.isnan(b.pages).any()
    for x, y in zip(a.reference(), b.reference()):
        np.testing.assert_array_equal(x, y)


def test_reference_and_measuring_agree_with_tvms_cpu_decode_kernel():
    """TVM's own CPU decode kernel (same semantics as its CUDA one: page layout, last-page length,
    base-2 lse) passes the check the GPU search applies, on poisoned pages; a wrong kernel fails it."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    key = AttentionKey(2, 2, 16, "float32")
    func = _attention_decode_cpu(key.h_kv, key.h_q, key.d, key.dtype, False, {})
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm").mod
    cases = {**D.decode_cases([3], [129]), "mixed": [1, 16, 17, 40, 129]}
    res = DT.measure_paged_decode(lib, key, cases, device=tvm.cpu(), number=1, repeat=1, timed=["b3_ctx129"])
    assert res["ok"], res
    assert res["out_err"] < 1e-5 and res["lse_err"] < 1e-4 and set(res["us"]) == {"b3_ctx129"}
    # the same inputs with the scale off: the check fails
    cache = {}
    DT.measure_paged_decode(lib, key, cases, device=tvm.cpu(), timed=[], cache=cache)
    inp, ref = cache["mixed"]
    lib["main"](*inp.args, 0, 1.0, 10000.0, inp.sm_scale * 1.01)
    assert DT.decode_errors(inp, ref)[1] > 1e-3


# ------------------------------------------------------------------------------------------------
# attention.json: a decode entry, applied at compile time
# ------------------------------------------------------------------------------------------------

TINY_KEY = AttentionKey(h_kv=2, h_q=2, d=64, dtype="float16")


def _decode_entry(config, template="decode", key=TINY_KEY):
    from dataclasses import asdict

    return {"kernel": D.DECODE_KERNEL, "key": asdict(key), "batches": [1, 8], "contexts": [256],
            "default": {"template": "tvm", "config": None}, "best": {"template": template, "config": config}}


def _prefill_entry(key=TINY_KEY):
    from dataclasses import asdict

    from tuning import attention as A

    return {"kernel": A.RAGGED_PREFILL, "key": asdict(key), "lengths": [64],
            "default": {"config": asdict(A.PrefillConfig(16, 32, 32, 4, 4))},
            "best": {"config": asdict(A.PrefillConfig(64, 16, 64, 4, 4))}}


@pytest.fixture(scope="module")
def tiny_prepared(sm90):
    from gpt2_model.config import GPT2Config
    from gpt2_model.export import export_model
    from tuning.pipeline import prepare

    ex = export_model(GPT2Config(vocab_size=101, n_positions=64, n_embd=128, n_layer=1, n_head=2),
                      quantization="q0f16", target=sm90)
    return prepare(ex.mod, target=sm90)


def test_apply_replaces_the_decode_kernel(tmp_path, sm90, tiny_prepared):
    import json

    from tuning import attention as A

    mod0 = tiny_prepared
    before_decode, before_prefill = mod0[D.DECODE_KERNEL], mod0[A.RAGGED_PREFILL]
    cfg = D.DecodeConfig(groups=8, tokens=2)
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": [_prefill_entry(), _decode_entry(
        {"groups": 8, "tokens": 2})]}))
    mod, applied = A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=sm90)
    assert len(applied) == 2 and any(a.startswith(D.DECODE_KERNEL) and "groups=8 tokens=2" in a for a in applied)
    new = mod[D.DECODE_KERNEL]
    assert tvm_ffi.structural_equal(new, A._with_attrs_of(D.make_decode_kernel(cfg, TINY_KEY, sm90), before_decode))
    assert not tvm_ffi.structural_equal(new, before_decode)
    assert new.attrs["global_symbol"] == D.DECODE_KERNEL and new.attrs["op_pattern"] == before_decode.attrs["op_pattern"]
    assert "rotary_mode must be 0" in new.script()
    assert not tvm_ffi.structural_equal(mod[A.RAGGED_PREFILL], before_prefill)  # the prefill entry too
    assert mod0[D.DECODE_KERNEL].same_as(before_decode)  # the caller's module is untouched
    # the sliding-window variant is not touched
    assert mod["batch_decode_paged_kv_sliding_window"].same_as(mod0["batch_decode_paged_kv_sliding_window"])

    # only a decode entry: the prefill kernel stays TVM's
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": [_decode_entry({"groups": 16, "tokens": 4})]}))
    mod, applied = A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=sm90)
    assert len(applied) == 1 and mod[A.RAGGED_PREFILL].same_as(before_prefill)
    assert "T.thread_binding(16, thread=\"threadIdx.y\")" in mod[D.DECODE_KERNEL].script()
    # a cluster split entry: the kernel launches clusters of 4 CTAs
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": [_decode_entry({"groups": 16, "tokens": 4,
                                                                                    "split": 4})]}))
    mod, applied = A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=sm90)
    assert len(applied) == 1 and "split=4" in applied[0]
    assert "T.thread_binding(4, thread=\"clusterCtaIdx.x\")" in mod[D.DECODE_KERNEL].script()
    # ... which a pre-Hopper target cannot build: one clear error, not a kernel that fails at launch
    with pytest.raises(A.AttentionError, match="cannot be built.*not legal"):
        A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=make_target("sm_86"))
    # under PDL (GPT2K_PDL) an unsplit choice runs in its l2 form (K/V to L2, then the PDL wait); a split one as stored
    import os
    from unittest import mock

    for stored, want in (({"groups": 16, "tokens": 4}, "groups=16 tokens=4 l2"), ({"groups": 16, "tokens": 4,
                                                                                  "split": 4}, "split=4")):
        (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": [_decode_entry(stored)]}))
        with mock.patch.dict(os.environ, {"GPT2K_PDL": "late"}):
            _, applied = A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=sm90)
        assert want in applied[0] and ("l2" in applied[0]) == ("split" not in stored), applied
        with mock.patch.dict(os.environ, {"GPT2K_PDL": "0"}):
            assert "l2" not in A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=sm90)[1][0]
    # only a prefill entry (the committed databases): the decode kernel stays TVM's
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": [_prefill_entry()]}))
    mod, applied = A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=sm90)
    assert len(applied) == 1 and mod[D.DECODE_KERNEL].same_as(before_decode)
    # another model's decode entry is not applied
    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": [_decode_entry({"groups": 8, "tokens": 2},
                                                                                   key=GPT2)]}))
    assert A.apply_attention(mod0, tmp_path, key=TINY_KEY, target=sm90) == (mod0, [])


def test_bad_decode_entries_are_one_clear_error(tmp_path, sm90, tiny_prepared):
    import json

    from tuning import attention as A

    def write(*entries):
        (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": list(entries)}))

    for bad in (_decode_entry({"groups": 8, "tokens": 2}, template="simt"),  # a prefill template for decode
                _decode_entry({"groups": 8}),  # a missing constant
                _decode_entry({"groups": 8, "tokens": 2, "warps": 4}),  # an unknown one
                {**_decode_entry({"groups": 8, "tokens": 2}), "kernel": "batch_decode_paged_kv_foo"}):
        write(_prefill_entry(), bad)
        with pytest.raises(A.AttentionError, match="not a valid attention tuning file"):
            A.read_attention(tmp_path)
    # well-formed, but not buildable for this key and target (12 groups: not a power of two)
    write(_decode_entry({"groups": 12, "tokens": 2}))
    with pytest.raises(A.AttentionError, match="cannot be built.*not legal"):
        A.apply_attention(tiny_prepared, tmp_path, key=TINY_KEY, target=sm90)


def test_writing_an_entry_keeps_the_other_kernels(tmp_path):
    import json

    from tuning import attention as A

    class Dev:
        device_name = "fake"

    (tmp_path / A.ATTENTION_FILE).write_text(json.dumps({"kernels": [_prefill_entry()]}))
    doc = A._write_entry(tmp_path, _decode_entry({"groups": 8, "tokens": 2}), device=Dev(), tuning_s=1.0)
    assert [e["kernel"] for e in doc["kernels"]] == [D.DECODE_KERNEL, A.RAGGED_PREFILL]
    doc = A._write_entry(tmp_path, _prefill_entry(), device=Dev(), tuning_s=1.0)  # a prefill re-run
    assert [e["kernel"] for e in doc["kernels"]] == [A.RAGGED_PREFILL, D.DECODE_KERNEL]
    assert A.read_attention(tmp_path)["kernels"][1]["best"]["config"] == {"groups": 8, "tokens": 2}


def test_tune_decode_attention_needs_a_local_gpu(tmp_path, sm90):
    from gpt2_model.config import GPT2Config

    from tuning import attention as A
    from tuning.attention_decode_tune import tune_decode_attention

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    with pytest.raises(A.AttentionError, match="local CUDA GPU"):
        tune_decode_attention(GPT2Config(vocab_size=101, n_positions=64, n_embd=128, n_layer=1, n_head=2),
                                dtype="float16", target=sm90, out_dir=tmp_path, batches=[1])
    assert not (tmp_path / A.ATTENTION_FILE).exists()


def test_measurement_timer_choice(monkeypatch):
    """The decode attention search times with CUDA graphs only where torch has CUDA (never here: the
    CPU test machine), else with ``time_evaluator``; an unknown timer is one clear error before anything runs."""
    from tuning.graph_timer import TIMER_ENV, graph_timer_available, resolve_timer

    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    assert graph_timer_available() == has_cuda
    assert resolve_timer("auto", tvm.cuda(0)) == ("cuda-graph" if has_cuda else "time_evaluator")
    assert resolve_timer("cuda-graph", tvm.cpu()) == "time_evaluator"  # a CPU kernel has no CUDA graph
    with pytest.raises(ValueError, match="timer 'events': the timer must be one of auto, cuda-graph, time_evaluator"):
        DT.measure_paged_decode(None, GPT2, {}, device=None, timer="events")
    # the environment chooses for ``auto`` (GPT2K_SEARCH_TIMER), and a bad value is one clear error too
    monkeypatch.setenv(TIMER_ENV, "time_evaluator")
    assert resolve_timer("auto", tvm.cuda(0)) == "time_evaluator"
    monkeypatch.setenv(TIMER_ENV, "wall")
    with pytest.raises(ValueError, match="GPT2K_SEARCH_TIMER='wall'"):
        resolve_timer("auto", tvm.cuda(0))


def test_cold_copies_span_more_than_l2():
    """Cold timing's argument sets: the original first, then device copies of every tensor (equal
    contents, other buffers), other values shared, as many sets as it takes to span the budget (at
    most one per captured call): a small kernel gets all 20, a 77 MB lm_head weight 2."""
    from tuning.graph_timer import COLD_BYTES, cold_copies

    w = tvm.runtime.tensor(np.arange(3 * 1024 * 1024, dtype="float16").reshape(3072, 1024))  # 6 MiB
    x = tvm.runtime.tensor(np.ones((8, 1024), dtype="float16"))
    sets = cold_copies([x, w, 7])
    assert COLD_BYTES == 128 << 20 and len(sets) == 20  # 20 x ~6 MiB = 120 MiB: capped at the 20 calls
    assert sets[0][0] is x and sets[0][1] is w and all(s[2] == 7 for s in sets)
    np.testing.assert_array_equal(sets[19][1].numpy(), w.numpy())
    sets[1][1].copyfrom(np.zeros((3072, 1024), "float16"))  # a copy is its own buffer
    assert sets[0][1].numpy()[1, 1] == 1025 and sets[2][1].numpy()[1, 1] == 1025 and sets[1][1].numpy().max() == 0
    big = cold_copies([w], budget=13 << 20)  # 13 MiB over 6 MiB a set: 3 sets
    assert len(big) == 3
