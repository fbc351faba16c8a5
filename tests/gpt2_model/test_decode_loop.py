"""The token-in/token-out steps and the device decode loop (llvm), against the logits path and HF.

One library with static buckets (decode b1/b2, prefill s9) next to the symbolic functions, so
both the bucket token functions and the symbolic fallback run. A full KV cache, a failed step
and bad input each get a test (issue 14: nothing half-updated, one clear error).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm

from gpt2_model.loader import load_hf_params
from gpt2_model.quantization import convert_params
from gpt2_model.runtime import Engine, EngineError, KVCacheFullError
from gpt2_model.config import get_config
from tuning.compile import build_model
from tuning.targets import make_target

from ..conftest import hf_last_logits, rel_err

PROMPT_A = [5, 17, 300, 2, 999, 4, 8, 1000, 42]  # 9 tokens: the s9 bucket
PROMPT_B = [7, 1, 2]
PROMPT_C = [11, 400, 3, 3, 90]
BUCKETS = {"decode": [1, 2], "prefill": [len(PROMPT_A)]}


@pytest.fixture(scope="module")
def built(hf_sharded):
    path, _ = hf_sharded
    config = get_config(path)
    result = build_model(config, quantization="q0f32", target=make_target("cpu"), buckets=BUCKETS)
    params = convert_params(load_hf_params(path, config), result.exported.scheme)
    return result, params


def _engine(built, **kwargs) -> Engine:
    result, params = built
    return Engine(exported=result.exported, executable=result.executable, params=params, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def engine(built):
    return _engine(built)


def _hf_greedy(reference, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf_last_logits(reference, ids).argmax()))
    return ids[len(prompt):]


def test_library_exports_token_steps(engine):
    assert engine.has_token_steps
    # bucket shapes run their static token function, other shapes the symbolic one
    assert engine.token_function("decode", 2) is not engine.token_function("decode", 3)
    assert engine.token_function("decode", 3) is engine.token_function("decode", 64)
    assert engine.token_function("prefill", len(PROMPT_A)) is not engine.token_function("prefill", 3)


def test_prefill_tokens_matches_logits_path_and_hf(engine, hf_sharded):
    _, reference = hf_sharded
    for prompt in (PROMPT_A, PROMPT_B):  # the s9 bucket, then the symbolic prefill
        s1, s2 = engine.add_sequence(), engine.add_sequence()
        host_logits = engine.prefill(s1, prompt)
        ids, logits = engine.prefill_tokens(s2, prompt, return_logits=True)
        assert isinstance(ids, tvm.runtime.Tensor) and ids.shape == (1,) and str(ids.dtype) == "int32"
        expected = hf_last_logits(reference, prompt)
        assert rel_err(logits.numpy().reshape(-1), expected) < 1e-4
        assert np.array_equal(logits.numpy().reshape(-1), host_logits)
        assert int(ids.numpy()[0]) == int(expected.argmax()) == int(host_logits.argmax())
        assert engine.sequence_length(s2) == len(prompt)
        engine.remove_sequence(s1)
        engine.remove_sequence(s2)


@pytest.mark.parametrize("prompts", [[PROMPT_A, PROMPT_B], [PROMPT_A, PROMPT_B, PROMPT_C]], ids=["b2-bucket", "b3-symbolic"])
def test_device_loop_equals_hf_greedy(engine, hf_sharded, prompts):
    """Batched decode with the ids fed from the device step to step: HF's greedy tokens."""
    _, reference = hf_sharded
    steps = 6
    seqs = [engine.add_sequence() for _ in prompts]
    first = [int(engine.prefill_tokens(s, p).numpy()[0]) for s, p in zip(seqs, prompts)]
    ids = tvm.runtime.tensor(np.array(first, np.int32), engine.device)
    got = [first]
    for _ in range(steps - 1):
        ids, logits = engine.decode_tokens(seqs, ids, return_logits=True)
        assert logits.shape == (len(seqs), 1, engine.config.vocab_size)
        got.append(ids.numpy().tolist())
    tokens = np.array(got).T  # (b, steps)
    for row, prompt in zip(tokens, prompts):
        assert row.tolist() == _hf_greedy(reference, prompt, steps)
    for seq, prompt in zip(seqs, prompts):
        assert engine.sequence_length(seq) == len(prompt) + steps - 1
        engine.remove_sequence(seq)


def test_decode_tokens_from_host_ids_equals_decode(engine):
    a, b = engine.add_sequence(), engine.add_sequence()
    engine.prefill(a, PROMPT_B)
    engine.prefill(b, PROMPT_B)
    logits = engine.decode([a], [42])[0]
    ids, dev_logits = engine.decode_tokens([b], [42], return_logits=True)
    assert np.array_equal(dev_logits.numpy().reshape(-1), logits)
    assert int(ids.numpy()[0]) == int(np.argmax(logits))
    engine.remove_sequence(a)
    engine.remove_sequence(b)


def test_generate_equals_hf_generate(engine, hf_sharded):
    import torch  # pylint: disable=import-outside-toplevel

    _, reference = hf_sharded
    for prompt in (PROMPT_A, PROMPT_C):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert engine.generate(prompt, 12) == theirs
        # the host-argmax loop (libraries without token steps) gives the same tokens
        seq = engine.add_sequence()
        try:
            assert engine._generate_on_host(seq, np.array(prompt, np.int32), 12, False) == theirs  # pylint: disable=protected-access
        finally:
            engine.remove_sequence(seq)
    assert engine.generate(PROMPT_B, 0) == []


def test_library_without_token_steps_falls_back_to_the_host_loop(built, engine):
    """A library built before the token entry points (simulated: none found) still generates
    the same tokens through the host-argmax loop; decode_tokens says what is missing."""
    old = _engine(built)
    old._token_fns = {key: None for key in old._token_fns}  # pylint: disable=protected-access
    assert not old.has_token_steps
    assert old.generate(PROMPT_C, 8) == engine.generate(PROMPT_C, 8)
    seq = old.add_sequence()
    old.prefill(seq, PROMPT_C)
    with pytest.raises(EngineError, match="no token-in/token-out entry points"):
        old.decode_tokens([seq], [1])
    assert old.sequence_length(seq) == len(PROMPT_C)


def test_generate_stop_at_eos_like_hf(built, hf_sharded):
    """With stop_at_eos the output ends at the first EOS, as HF generate's does. The random
    checkpoint repeats tokens, so EOS is set to a token this prompt first produces at step 20:
    past the first periodic host check (every EOS_CHECK_EVERY = 16 steps), before the second."""
    import torch  # pylint: disable=import-outside-toplevel

    from gpt2_model.runtime import EOS_CHECK_EVERY  # pylint: disable=import-outside-toplevel

    _, reference = hf_sharded
    prompt, eos, n = [284, 177, 314, 715, 313, 919], 146, 40
    engine = _engine(built)
    engine.config = dataclasses.replace(engine.config, eos_token_id=eos)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                    pad_token_id=eos, eos_token_id=eos)[0, len(prompt):].tolist()
    assert EOS_CHECK_EVERY < len(theirs) < 2 * EOS_CHECK_EVERY and theirs[-1] == eos and theirs.count(eos) == 1
    assert engine.generate(prompt, n, stop_at_eos=True) == theirs
    full = engine.generate(prompt, n)
    assert len(full) == n and full[:len(theirs)] == theirs


def test_full_kv_cache_is_checked_before_the_call_and_leaves_nothing_behind(built, hf_sharded):
    """Issue 14 item 2: 5 pages of 16 tokens; a prompt that needs more pages than are free is
    refused before the cache is touched, and after space is freed the same sequence prefills to
    HF's logits (TVM's own failure left it registered with stale pages: wrong logits later)."""
    _, reference = hf_sharded
    engine = _engine(built, max_total_seq_len=64, page_size=16)
    rng = np.random.default_rng(0)
    long_a = rng.integers(0, 1000, 60).tolist()  # 4 pages
    long_b = rng.integers(0, 1000, 40).tolist()  # 3 pages
    a, b = engine.add_sequence(), engine.add_sequence()
    engine.prefill(a, long_a)
    free = engine.free_pages()
    assert free * 16 < len(long_b)
    for call in (lambda: engine.prefill(b, long_b), lambda: engine.prefill_tokens(b, long_b)):
        with pytest.raises(KVCacheFullError, match=r"needs 40 more tokens \(3 pages of 16 tokens\) but only "
                                                   rf"{free} pages \({free * 16} tokens\) are free"):
            call()
        assert engine.sequence_length(b) == 0 and engine.free_pages() == free
    with pytest.raises(KVCacheFullError, match="KV cache full"):
        engine.generate(long_b, 4)  # checked for the whole run before the first step
    engine.remove_sequence(a)
    ours = engine.prefill(b, long_b)
    assert rel_err(ours, hf_last_logits(reference, long_b)) < 1e-4
    # decode at a page boundary with no page free: refused, sequence unchanged
    c = engine.add_sequence()
    engine.prefill(c, long_a[:16 * engine.free_pages()])
    assert engine.free_pages() == 0
    before = engine.sequence_length(c)
    with pytest.raises(KVCacheFullError, match="needs 1 more tokens"):
        engine.decode_tokens([c], [1])
    assert engine.sequence_length(c) == before


def test_failed_step_is_rolled_back(built, hf_sharded, monkeypatch):
    """An error inside the step (after begin_forward) pops the appended tokens again."""
    _, reference = hf_sharded
    engine = _engine(built)
    seq = engine.add_sequence()
    engine.prefill(seq, PROMPT_B)
    free = engine.free_pages()

    def boom(*_args, **_kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(engine, "_call_tokens", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        engine.decode_tokens([seq], [4])
    monkeypatch.setattr(engine, "run_prefill", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        engine.prefill(seq, PROMPT_A)
    monkeypatch.undo()
    assert engine.sequence_length(seq) == len(PROMPT_B) and engine.free_pages() == free
    logits = engine.decode([seq], [4])[0]
    assert rel_err(logits, hf_last_logits(reference, PROMPT_B + [4])) < 1e-4


def test_bad_token_input_is_refused(engine):
    seq = engine.add_sequence()
    with pytest.raises(EngineError, match="must be integers, got float64"):
        engine.prefill(seq, [1.0, 2.7])
    with pytest.raises(EngineError, match="must be integers"):
        engine.prefill_tokens(seq, np.array([3.0], np.float32))
    with pytest.raises(EngineError, match="must be integers, got bool"):
        engine.decode([seq], [True])
    with pytest.raises(EngineError, match="must be integers"):
        engine.generate([1.5, 2], 3)
    for bad in (-1, 2.0, True, None):
        with pytest.raises(EngineError, match="max_new_tokens must be an integer >= 0"):
            engine.generate(PROMPT_B, bad)
    assert engine.sequence_length(seq) == 0
    engine.prefill(seq, PROMPT_B)
    wrong = tvm.runtime.tensor(np.array([1.0], np.float32), engine.device)
    with pytest.raises(EngineError, match="int32 vector"):
        engine.decode_tokens([seq], wrong)
    with pytest.raises(EngineError, match="one token per sequence"):
        engine.decode_tokens([seq], tvm.runtime.tensor(np.array([1, 2], np.int32), engine.device))
    with pytest.raises(EngineError, match=r"token ids must be in \[0, 1001\)"):
        engine.decode_tokens([seq], [1001])
    assert engine.sequence_length(seq) == len(PROMPT_B)
    engine.remove_sequence(seq)


# ---------------------------------------------------------------------------------------- GPU
def _gpu_generate_check(preset: str, quantization: str, dtype: str, *, database=None):
    """Greedy Engine.generate (device loop, CUDA graphs) vs HF generate on the same GPU, same
    seeded weights and dtype, 32 tokens; on a mismatch the message gives HF fp32's top-2 margin."""
    import torch  # pylint: disable=import-outside-toplevel

    from bench.peers import build_hf_model, random_params  # pylint: disable=import-outside-toplevel
    from tuning.engine import build_engine  # pylint: disable=import-outside-toplevel

    config = get_config(preset)
    params = random_params(config, seed=0)
    engine = build_engine(config, params, quantization=quantization, device="cuda", database=database,
                          cuda_graph=True)
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, 16).tolist()
    model = build_hf_model(config, params=params, dtype=dtype, device="cuda")
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None,
                                attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()
    ours = engine.generate(prompt, 32)
    bad = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    detail = ""
    if bad is not None:
        ref = build_hf_model(config, params=params, dtype="float32", device="cuda")
        with torch.no_grad():
            top = torch.topk(ref(torch.tensor([prompt + theirs[:bad]], device="cuda")).logits[0, -1].float(), 2)
        detail = f"first mismatch at step {bad}: HF fp32 top-2 {top.indices.tolist()}, margin {float(top.values[0] - top.values[1]):.4g}"
    assert ours == theirs, detail
    seq = engine.add_sequence()  # and the host-argmax loop agrees
    assert engine._generate_on_host(seq, np.array(prompt, np.int32), 32, False) == ours  # pylint: disable=protected-access
    return engine


def _committed_db(arch: str | None):
    from pathlib import Path  # pylint: disable=import-outside-toplevel

    db = Path(__file__).resolve().parents[2] / "databases" / (arch or "none") / "gpt2-q0f16"
    return db if db.is_dir() else None


@pytest.mark.gpu
def test_cuda_generate_q0f32_equals_hf_generate():
    _gpu_generate_check("tiny-h64", "q0f32", "float32")


@pytest.mark.gpu
def test_cuda_generate_q0f16_preset_equals_hf_generate():
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel

    _gpu_generate_check("gpt2", "q0f16", "float16", database=_committed_db(detect_cuda_arch()))


@pytest.mark.gpu
@pytest.mark.parametrize("preset,quantization,dtype", [("tiny-h64", "q0f32", "float32"), ("gpt2", "q0f16", "float16")])
def test_cuda_generate_waiting_for_step_marks_equals_hf_generate(monkeypatch, preset, quantization, dtype):
    """GPT2K_STEP_MARK=1 (the default): each step waits only for the previous step's mark (after its last
    attention), so the host's KV-cache copy and launch overlap the previous step's tail. Greedy
    generate still equals HF token for token, and the device loop's waits were mark waits."""
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv("GPT2K_STEP_MARK", "1")
    db = _committed_db(detect_cuda_arch()) if preset == "gpt2" else None
    engine = _gpu_generate_check(preset, quantization, dtype, database=db)
    g = engine.graphs
    assert g.wait_for_mark and g.marks > 0
    assert g.mark_waits >= 31, (g.marks, g.mark_waits, g.captures, g.replays)  # every decode step of generate


# ------------------------------------------------------------------------- whole-step CUDA graphs
def test_cuda_graph_flag_is_ignored_on_the_cpu(built):
    engine = _engine(built, cuda_graph=True)
    assert engine.graphs is None  # no graphs on the CPU
    assert engine.generate(PROMPT_A, 3) == _engine(built).generate(PROMPT_A, 3)


def test_page_size_other_than_the_kernels_is_refused(built):
    with pytest.raises(EngineError, match="page_size must be 16"):
        _engine(built, page_size=32)


def test_cuda_runtime_without_a_gpu_is_one_clear_error():
    from gpt2_model.cuda_graph import CudaError, CudaRuntime  # pylint: disable=import-outside-toplevel

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA device is present")
    with pytest.raises(CudaError, match="CUDA"):
        CudaRuntime(0).create_stream()


@pytest.mark.gpu
def test_cuda_whole_step_graphs_equal_plain_steps(caplog):
    """One library (gpt2 q0f16, the committed database if any), two engines: whole-step graphs and
    plain steps. A 128-token prefill (the s128 bucket) and 24 decode steps of 2 sequences (the b2
    bucket), twice over so the second pass replays only: the same ids, the same logits."""
    from pathlib import Path  # pylint: disable=import-outside-toplevel

    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel
    from tuning.compile import build_model  # pylint: disable=import-outside-toplevel,reimported
    from tuning.targets import make_target  # pylint: disable=import-outside-toplevel,reimported

    config = get_config("gpt2")
    arch = detect_cuda_arch()
    db = Path(__file__).resolve().parents[2] / "databases" / (arch or "none") / "gpt2-q0f16"
    result = build_model(config, quantization="q0f16", target=make_target(arch), database=db if db.is_dir() else None,
                         cuda_graph=True)
    from gpt2_model.loader import random_params  # pylint: disable=import-outside-toplevel

    params = random_params(result.exported, seed=0)
    engines = [Engine(exported=result.exported, executable=result.executable, params=params, device="cuda",
                      max_batch_size=4, cuda_graph=g) for g in (False, True)]
    assert engines[0].graphs is None and engines[1].graphs is not None
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, config.vocab_size, 128).tolist() for _ in range(2)]
    runs = []
    for engine in engines:
        ids_log, logits_log = [], []
        for _ in range(2):  # the second pass replays graphs captured in the first
            seqs = [engine.add_sequence() for _ in prompts]
            first = []
            for seq, prompt in zip(seqs, prompts):
                nid, logits = engine.prefill_tokens(seq, prompt, return_logits=True)
                first.append(int(nid.numpy()[0]))
                logits_log.append(logits.numpy().reshape(-1).copy())
            ids = first
            ids_log.append(list(first))
            for _ in range(24):
                nid, logits = engine.decode_tokens(seqs, ids, return_logits=True)  # host ids first, then device
                ids_log.append(nid.numpy().tolist())
                logits_log.append(logits.numpy().reshape(-1).copy())
                ids = nid
            for seq in seqs:
                engine.remove_sequence(seq)
        runs.append((ids_log, logits_log))
    g = engines[1].graphs
    assert g.enabled, f"graph capture failed: {caplog.text}"
    decode_keys = len({-(-(128 + i + 1) // 16) for i in range(24)})  # a new graph every 16 tokens (pages)
    assert g.captures == 1 + decode_keys, (g.captures, g.replays)  # prefill s128 + the decode b2 keys
    assert g.replays == 2 * (2 + 24) - g.captures  # every other graph step was a replay
    assert runs[1][0] == runs[0][0]
    for ours, plain in zip(runs[1][1], runs[0][1]):
        assert np.abs(ours - plain).max() <= 1e-3 * np.abs(plain).max()


@pytest.mark.slow  # two CUDA builds of the tiny model on the CPU (nvcc)
def test_graphs_need_a_library_built_with_static_storage(tmp_path, caplog):
    """Whole-step graphs need the use_cuda_graph rewrite's fixed storage: a library built with it
    is recognised, one built without it (or one whose VM code cannot be read) is refused with a
    warning (the engine then runs plain steps)."""
    from gpt2_model.cuda_graph import has_static_storage  # pylint: disable=import-outside-toplevel

    config, target = get_config("tiny"), make_target("sm_90")
    with_graphs = build_model(config, quantization="q0f16", target=target, cuda_graph=True).executable
    assert has_static_storage(with_graphs)
    assert not caplog.records
    plain = build_model(config, quantization="q0f16", target=target, cuda_graph=False).executable
    assert not has_static_storage(plain)
    assert "built without relax.backend.use_cuda_graph" in caplog.text
    caplog.clear()  # an exported library loaded back is read the same way (a CPU one here)
    cpu_lib = build_model(config, quantization="q0f32", target=make_target("cpu")).executable
    cpu_lib.export_library(str(tmp_path / "lib.so"))
    assert not has_static_storage(tvm.runtime.load_module(str(tmp_path / "lib.so")))
    assert "built without" in caplog.text and "cannot read" not in caplog.text
    assert not has_static_storage(tvm.runtime.tensor(np.zeros(1, np.float32)))  # not a library
    assert "cannot read this library's VM code" in caplog.text
