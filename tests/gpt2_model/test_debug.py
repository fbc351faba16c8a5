"""Debug tools: kernel dumps (DebugChat), compare-hf, compare-builds, op.print_ inside the model.

Everything runs on the CPU (llvm) with a tiny random checkpoint written by `transformers`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpt2_model.debug import (  # noqa: E402
    DebugChat,
    DebugError,
    KernelRecorder,
    compare_builds,
    compare_dumps,
    compare_hf,
    load_dump,
    trace,
)
from tuning.debug_cli import main as debug_main  # noqa: E402
from gpt2_model.runtime import Engine  # noqa: E402

from ..conftest import save_hf_checkpoint  # noqa: E402

LLVM = {"kind": "llvm"}
PROMPT = [5, 6, 7]


def _target():
    return tvm.target.Target(LLVM)


def _write_tokenizer(path, vocab_size):
    """A word-level tokenizer.json: 'w{i}' is token i (0 is [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(checkpoint dir with tokenizer.json, HF model in eval mode)."""
    path = tmp_path_factory.mktemp("debug_hf")
    model = save_hf_checkpoint(path, seed=3)
    _write_tokenizer(path, model.config.vocab_size)
    return path, model


def _engine(exported, executable, params):
    return Engine(exported=exported, executable=executable, params=params, device="cpu", target=_target())


@pytest.fixture(scope="module")
def builds(hf, tmp_path_factory):
    """Build A (untouched) and build B (one prefill kernel adds 1.0 to its output), as engines and .so files."""
    from gpt2_model.config import get_config  # pylint: disable=import-outside-toplevel
    from gpt2_model.export import export_model  # pylint: disable=import-outside-toplevel
    from gpt2_model.loader import load_hf_params  # pylint: disable=import-outside-toplevel
    from gpt2_model.quantization import convert_params  # pylint: disable=import-outside-toplevel
    from tuning.compile import build, build_module  # pylint: disable=import-outside-toplevel
    from tuning.pipeline import prepare  # pylint: disable=import-outside-toplevel

    path, _ = hf
    out = tmp_path_factory.mktemp("debug_libs")
    config = get_config(path)
    exported = export_model(config, quantization="q0f32", target=_target())
    params = convert_params(load_hf_params(path, config), exported.scheme)
    exe_a = build(exported, target=_target())
    engine_a = _engine(exported, exe_a, params)

    # The kernel to corrupt: the one that reads layer 0's c_fc weight during prefill (found by
    # tracing build A, so the test does not depend on fused-kernel naming).
    (prefill,) = trace(engine_a, PROMPT, decode_steps=0)
    (c_fc,) = prefill.find(param="transformer.h.0.mlp.c_fc.weight")
    mod = prepare(exported.mod, target=_target())
    gvar = mod.get_global_var(c_fc.name)
    mod[gvar] = _add_one_to_output(mod[gvar])
    exe_b = build_module(mod, target=_target(), scheduled=mod)
    engine_b = _engine(exported, exe_b, params)

    lib_a, lib_b = out / "a.so", out / "b.so"
    exe_a.export_library(str(lib_a))
    exe_b.export_library(str(lib_b))
    return {"exported": exported, "params": params, "executable_a": exe_a, "a": engine_a, "b": engine_b,
            "lib_a": lib_a, "lib_b": lib_b, "corrupted": c_fc.name}


def _add_one_to_output(func):
    """The same PrimFunc whose stores into its output buffer (last parameter) add 1.0."""
    text = func.script()
    out = func.params[-1].name
    store = re.compile(rf"^(\s*{re.escape(out)}\[[^\]]*\] = )(.*)$", re.M)
    text, count = store.subn(lambda m: f"{m.group(1)}({m.group(2)}) + T.float32(1.0)", text)
    assert count == 1, f"expected one store into {out}, found {count}"
    return tvm.script.from_source(text)


# ----------------------------------------------------------------------------- DebugChat
def test_debug_chat_dumps(builds, tmp_path):
    engine = builds["a"]
    config = engine.config
    result = DebugChat(engine, debug_dir=tmp_path).generate(PROMPT, generate_len=3)

    # The instrumented run generates what the plain engine generates.
    assert result.tokens == engine.generate(PROMPT, 3)
    assert [p.name for p in result.step_dirs] == ["prefill", "decode_1", "decode_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode_1", "decode_2", "prefill"]

    for folder, n_tokens in zip(result.step_dirs, (len(PROMPT), 1, 1)):
        manifest = json.loads((folder / "manifest.json").read_text())
        files = [c["file"] for c in manifest["calls"]]
        assert files == [f"f{i}_{c['kernel']}.npz" for i, c in enumerate(manifest["calls"])]
        assert all((folder / f).is_file() for f in files)
        # f0 is the token embedding: take(wte, ids) -> (n, n_embd)
        assert re.fullmatch(r"f0_take\w*\.npz", files[0])
        with np.load(folder / files[0]) as f0:
            assert f0["arg_0"].shape == (config.vocab_size, config.n_embd)
            assert f0["arg_1"].tolist() == (PROMPT if folder.name == "prefill" else [result.tokens[int(folder.name[-1]) - 1]])
            assert f0["arg_2"].shape == (n_tokens, config.n_embd)
            np.testing.assert_array_equal(f0["arg_2"], f0["arg_0"][f0["arg_1"]])
        with np.load(folder / "logits.npz") as lg:
            assert lg["logits"].shape == (config.vocab_size,)
            assert int(np.argmax(lg["logits"])) == result.tokens[result.step_dirs.index(folder)]
        # The last kernel is the tied lm_head: its output is the step's logits.
        with np.load(folder / files[-1]) as last, np.load(folder / "logits.npz") as lg:
            np.testing.assert_array_equal(last[f"arg_{len(last.files) - 1}"].reshape(-1), lg["logits"])

    # A layer norm dump checked against NumPy on its own recorded arguments.
    prefill = json.loads((result.step_dirs[0] / "manifest.json").read_text())
    ln = next(c for c in prefill["calls"] if c["args"][1]["param"] == "transformer.h.1.ln_2.weight")
    with np.load(result.step_dirs[0] / ln["file"]) as d:
        x, g, b, y = d["arg_0"], d["arg_1"], d["arg_2"], d["arg_3"]
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ref = (x - mean) / np.sqrt(var + config.layer_norm_epsilon) * g + b
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert y.shape == (1, len(PROMPT), config.n_embd)

    # The attention call: (kv cache, layer id, sm scale, qkv, out).
    attn = [c for c in prefill["calls"] if c["kernel"].startswith("attention")]
    assert len(attn) == config.n_layer
    assert attn[1]["args"][0]["kind"] == "object"  # the KV cache: recorded as an object, not as values
    with np.load(result.step_dirs[0] / attn[1]["file"]) as d:
        assert int(d["arg_1"]) == 1
        qkv, out = d["arg_3"], d["arg_4"]
    n, h, hd = len(PROMPT), config.n_head, config.head_dim
    assert qkv.shape == (n, 3 * h, hd) and out.shape == (n, h, hd)
    # The recorded output is causal softmax attention of the recorded q, k, v (NumPy reference;
    # the whole prompt is one prefill into an empty cache, so k and v are this call's).
    q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
    scale = (hd ** -0.5 if config.scale_attn_weights else 1.0) / (2.0 if config.scale_attn_by_inverse_layer_idx else 1.0)
    scores = np.einsum("qhd,khd->hqk", q, k).astype(np.float64) * scale
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("hqk,khd->qhd", probs, v), rtol=1e-4, atol=1e-5)

    # Reading the dump back gives the same calls and values.
    steps = load_dump(tmp_path)
    assert [s.name for s in steps] == ["prefill", "decode_1", "decode_2"]
    assert len(steps[0].calls) == len(prefill["calls"])
    np.testing.assert_array_equal(steps[0].calls[0].output, np.load(result.step_dirs[0] / prefill["calls"][0]["file"])["arg_2"])
    assert steps[0].calls[attn[1]["index"]].args[:2] == [None, 1]  # the KV cache object reads back as None


def test_debug_chat_cli_text_prompt(hf, builds, tmp_path, capsys):
    path, _ = hf
    out = tmp_path / "dump"
    code = debug_main(["debug-chat", "--model", str(path), "--model-lib", str(builds["lib_a"]),
                       "--device", "cpu", "--debug-dir", str(out), "--generate-len", "2", "w5 w6 w7"])
    printed = capsys.readouterr().out
    assert code == 0
    tokens = builds["a"].generate(PROMPT, 2)
    assert "prompt ids: 5,6,7" in printed
    assert f"tokens: {','.join(map(str, tokens))}" in printed
    assert "text: " + " ".join(f"w{t}" if t else "[UNK]" for t in tokens) in printed
    assert (out / "prefill" / "logits.npz").is_file() and (out / "decode_1" / "logits.npz").is_file()
    assert not (out / "decode_2").exists()


def test_debug_errors(builds, tmp_path):
    engine = builds["a"]
    with pytest.raises(DebugError, match="tokenizer"):
        DebugChat(engine, debug_dir=tmp_path).generate("some text", generate_len=1)
    with pytest.raises(DebugError, match="prefill chunk"):
        trace(engine, [1] * (engine.config.prefill_chunk_size + 1), decode_steps=0)
    with pytest.raises(DebugError, match="no step folders"):
        load_dump(tmp_path)
    assert debug_main(["debug-chat", "--model", str(tmp_path), "--debug-dir", str(tmp_path / "d"),
                       "--prompt-ids", "1,2"]) != 0


# ----------------------------------------------------------------------------- compare-hf
def test_compare_hf_correct_build(builds, hf):
    engine = builds["a"]
    result = compare_hf(engine=engine, hf_model=hf[1], prompt_ids=PROMPT + [9, 10], decode_steps=1)
    per_layer = ["ln_1", "attn.c_attn", "attn.core", "attn", "ln_2", "mlp.c_fc", "mlp"]
    expected = ["wte", "embed"]
    for i in range(engine.config.n_layer):
        expected += [f"h.{i}.{r}" for r in per_layer] + [f"h.{i}"]
    expected += ["ln_f", "logits"]
    assert [r.name for r in result.rows if r.step == "prefill"] == expected
    assert [r.name for r in result.rows if r.step == "decode_1"] == expected
    assert result.ok, result.table()
    assert max(r.rel for r in result.rows) < 1e-4
    # Not vacuous: the compared values are real activations.
    assert min(r.shape[-1] for r in result.rows) >= engine.config.n_embd
    assert "all rows within tolerance" in result.table()


def test_compare_hf_pinpoints_corrupted_weight(builds, hf):
    params = dict(builds["params"])
    params["transformer.h.1.mlp.c_fc.weight"] = params["transformer.h.1.mlp.c_fc.weight"] * 1.5
    engine = _engine(builds["exported"], builds["executable_a"], params)
    result = compare_hf(engine=engine, hf_model=hf[1], prompt_ids=PROMPT, decode_steps=0)
    first = result.first_failure
    assert first is not None and (first.step, first.name) == ("prefill", "h.1.mlp.c_fc")
    names = [r.name for r in result.rows]
    assert all(r.ok for r in result.rows[: names.index("h.1.mlp.c_fc")])
    assert "<< first" in result.table()


def test_compare_hf_cli(hf, builds, tmp_path, capsys):
    path, _ = hf
    out = tmp_path / "hf.json"
    code = debug_main(["compare-hf", "--model", str(path), "--model-lib", str(builds["lib_a"]),
                       "--prompt-ids", "3,4,5,6", "--decode-steps", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(out.read_text())
    assert data["ok"] and data["first_failure"] is None
    assert {r["name"] for r in data["rows"]} >= {"h.1.mlp", "ln_f", "logits"}
    assert "h.1.attn.core" in printed


# ----------------------------------------------------------------------------- compare-builds
def test_compare_builds_pinpoints_corrupted_kernel(builds):
    result = compare_builds(engine_a=builds["a"], engine_b=builds["b"], prompt_ids=PROMPT, decode_steps=1)
    first = result.first_failure
    assert first is not None
    assert (first.step, first.kernel, first.note) == ("prefill", builds["corrupted"], "h.0.mlp.c_fc")
    assert first.replay_rel > 0.1
    rows = result.rows
    nxt = rows[rows.index(first) + 1]
    # The next kernel receives the corrupted values (direct error) but is right on A's inputs.
    assert nxt.note == "h.0.mlp.c_proj" and nxt.rel > 1e-2 and nxt.replay_rel == 0.0 and nxt.status == "propagated"
    # Layer 1's call of the same kernel is also flagged by replay; decode kernels are intact.
    failing = [(r.step, r.note) for r in rows if not r.ok]
    assert failing == [("prefill", "h.0.mlp.c_fc"), ("prefill", "h.1.mlp.c_fc")]


def test_compare_builds_identical_is_clean(builds):
    result = compare_builds(engine_a=builds["a"], engine_b=builds["a"], prompt_ids=PROMPT, decode_steps=1)
    assert result.ok and not result.unmatched
    assert all(r.rel == 0.0 for r in result.rows)
    assert sum(r.replay_rel is not None for r in result.rows) > 10


@pytest.mark.slow  # builds two libraries and replays each kernel (15 s on 2 cores)
def test_compare_builds_aligns_renamed_kernels(builds):
    """A build with static-shape bucket entry points runs other kernels (other names, extra
    reshapes); calls are paired by parameters and shapes, and the builds agree."""
    from gpt2_model.export import export_model  # pylint: disable=import-outside-toplevel
    from tuning.compile import build  # pylint: disable=import-outside-toplevel

    base = builds["exported"]
    exported = export_model(base.config, quantization="q0f32", target=_target(),
                            buckets={"prefill": [len(PROMPT)], "decode": [1]})
    engine_b = _engine(exported, build(exported, target=_target()), builds["params"])
    assert engine_b.buckets == {"prefill": [len(PROMPT)], "decode": [1]}
    result = compare_builds(engine_a=builds["a"], engine_b=engine_b, prompt_ids=PROMPT, decode_steps=1)
    assert result.ok, result.table()
    renamed = [r for r in result.rows if " | " in r.kernel]
    assert any(r.note == "h.1.mlp.c_fc" for r in renamed)
    # Every parameter-reading kernel of A found its counterpart in B.
    assert not [u for u in result.unmatched if " A " in u and "[]" not in u], result.unmatched


def test_compare_builds_cli_and_dumps(hf, builds, tmp_path, capsys):
    path, _ = hf
    out = tmp_path / "builds.json"
    code = debug_main(["compare-builds", "--model", str(path), "--lib-a", str(builds["lib_a"]),
                       "--lib-b", str(builds["lib_b"]), "--prompt-ids", "5,6,7", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "<< first" in printed and builds["corrupted"] in printed
    data = json.loads(out.read_text())
    assert data["first_failure"]["kernel"] == builds["corrupted"] and data["first_failure"]["step"] == "prefill"

    # The same verdict from two debug-chat dumps compared call by call (no replay).
    DebugChat(builds["a"], debug_dir=tmp_path / "a").generate(PROMPT, generate_len=1)
    DebugChat(builds["b"], debug_dir=tmp_path / "b").generate(PROMPT, generate_len=1)
    dumped = compare_dumps(tmp_path / "a", tmp_path / "b")
    assert (dumped.first_failure.kernel, dumped.first_failure.note) == (builds["corrupted"], "h.0.mlp.c_fc")


# ----------------------------------------------------------------------------- op.print_
@pytest.mark.slow  # an extra debug build of the model (16 s on 2 cores)
def test_op_print_in_model(builds, capfd):
    """op.print_ inside the model prints at run time (debug=True, effect_mode='packed')."""
    from tvm.relax.frontend.nn import op  # pylint: disable=import-outside-toplevel

    from gpt2_model.export import export_model  # pylint: disable=import-outside-toplevel
    from gpt2_model.model import GPT2LMHeadModel  # pylint: disable=import-outside-toplevel
    from tuning.compile import build  # pylint: disable=import-outside-toplevel

    class PrintingGPT2(GPT2LMHeadModel):
        def batch_decode(self, input_embeds, paged_kv_cache):
            hidden = self.transformer(input_embeds, paged_kv_cache)  # ln_f output (b, 1, n_embd)
            op.print_(hidden)
            return self._lm_head(hidden), paged_kv_cache

    base = builds["exported"]
    model = PrintingGPT2(base.config, base.scheme, _target())
    # Without debug=True the print has no IO effect to thread through.
    with pytest.raises(Exception, match="_io"):
        model.export_tvm(spec=model.get_default_spec(), debug=True)

    exported = export_model(base.config, quantization=base.scheme.name, target=_target(), debug=True,
                            model_cls=PrintingGPT2)
    engine = _engine(exported, build(exported, target=_target()), builds["params"])

    seq = engine.add_sequence()
    logits = engine.prefill(seq, PROMPT)
    token = int(np.argmax(logits))
    capfd.readouterr()
    with KernelRecorder(engine) as rec:
        out_logits = engine.decode([seq], [token])
    printed = capfd.readouterr().out
    assert re.search(r"test_debug\.py:\d+: shape = \(1, 1, 64\), dtype = float32, data =", printed), printed
    values = np.array([float(x) for x in re.findall(r"-?\d+\.\d*(?:e[-+]\d+)?", printed.split("data =", 1)[1])])
    ln_f = [c for c in rec.calls if "transformer.ln_f.weight" in c.params()]
    assert len(ln_f) == 1
    np.testing.assert_allclose(values, ln_f[0].output.reshape(-1), rtol=1e-5, atol=1e-6)
    # And the printing build computes the same logits as the plain one.
    ref_seq = builds["a"].add_sequence()
    builds["a"].prefill(ref_seq, PROMPT)
    ref = builds["a"].decode([ref_seq], [token])[0]
    builds["a"].remove_sequence(ref_seq)
    np.testing.assert_allclose(out_logits.reshape(-1), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- other formats / GPU
@pytest.mark.slow  # a q4f16_1 build on top of the q0f32 compare-hf tests (14 s on 2 cores)
def test_compare_hf_q4f16_1(hf):
    """4-bit build: kernels found through q_weight params, reference weights rounded the same way."""
    from gpt2_model.debug import HF_RTOL  # pylint: disable=import-outside-toplevel
    from tuning.workflow import debug_engine  # pylint: disable=import-outside-toplevel

    engine = debug_engine(hf[0], device="cpu", quantization="q4f16_1")
    assert any(n.endswith("mlp.c_fc.q_weight") for n in engine.exported.param_names)
    result = compare_hf(engine=engine, hf_model=hf[1], prompt_ids=PROMPT, decode_steps=1)
    assert result.ok, result.table()
    assert result.rows[0].rtol == HF_RTOL["q4f16_1"]
    # fp16 activations: visibly not bit-exact, yet far inside the tolerance.
    assert 1e-6 < max(r.rel for r in result.rows) < HF_RTOL["q4f16_1"] / 2


@pytest.mark.gpu
def test_debug_tools_on_cuda(tmp_path):
    """CUDA: dumps, compare-hf (fp16, dlight kernels) and kernel replay on device tensors.

    head_dim 64 as in every GPT-2 preset: with head_dim 16 TVM's paged-KV decode kernel launches
    with blockDim.z = 128 (> 64) and fails with CUDA_ERROR_INVALID_VALUE.
    """
    from tuning.workflow import debug_engine  # pylint: disable=import-outside-toplevel

    hf_dir = tmp_path / "hf"
    hf_model = save_hf_checkpoint(hf_dir, seed=4, n_embd=128, n_head=2, n_inner=256)
    engine = debug_engine(hf_dir, device="cuda", quantization="q0f16")
    result = DebugChat(engine, debug_dir=tmp_path / "dump").generate(PROMPT, generate_len=2)
    assert result.tokens == engine.generate(PROMPT, 2)
    with np.load(tmp_path / "dump" / "decode_1" / "logits.npz") as lg:
        assert lg["logits"].shape == (hf_model.config.vocab_size,)
    hf_result = compare_hf(engine=engine, hf_model=hf_model, prompt_ids=PROMPT, decode_steps=1)
    print(hf_result.table())
    assert hf_result.ok, hf_result.table()
    same = compare_builds(engine_a=engine, engine_b=engine, prompt_ids=PROMPT, decode_steps=1)
    assert same.ok and all(r.replay_rel is None or r.replay_rel <= 1e-6 for r in same.rows), same.table()
    assert sum(r.replay_rel is not None for r in same.rows) > 10
