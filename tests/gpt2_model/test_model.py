"""GPT-2 on TVM (llvm) against transformers.GPT2LMHeadModel on random checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt2_model.loader import load_hf_params
from gpt2_model.quantization import dequantize_params
from gpt2_model.runtime import ContextWindowError, Engine, EngineError
from tuning.engine import engine_from_hf

from ..conftest import hf_last_logits, rel_err

PROMPT_A = [5, 17, 300, 2, 999, 4, 8, 1000, 42]  # 1000: the last id of the odd vocab
PROMPT_B = [7, 1, 2]


def _run_and_compare(engine: Engine, reference, tol: float, steps: int = 4) -> tuple[list[int], list[int]]:
    """Prefill two sequences of different lengths, then `steps` batched decode steps; compare each.

    Returns the two token sequences (prompt + greedy tokens of our engine).
    """
    sa, sb = engine.add_sequence(), engine.add_sequence()
    ta, tb = list(PROMPT_A), list(PROMPT_B)
    la, lb = engine.prefill(sa, ta), engine.prefill(sb, tb)
    for _ in range(steps + 1):
        for ours, toks in ((la, ta), (lb, tb)):
            err = rel_err(ours, hf_last_logits(reference, toks))
            assert err < tol, f"relative error {err:.3g} >= {tol} after {len(toks)} tokens"
        na, nb = int(la.argmax()), int(lb.argmax())
        ta.append(na)
        tb.append(nb)
        out = engine.decode([sa, sb], [na, nb])
        assert out.shape == (2, engine.config.vocab_size)
        la, lb = out[0], out[1]
    assert (engine.sequence_length(sa), engine.sequence_length(sb)) == (len(ta), len(tb))
    engine.remove_sequence(sa)
    engine.remove_sequence(sb)
    return ta, tb


@pytest.fixture(scope="module")
def engine_f32(hf_sharded):
    path, _ = hf_sharded
    return engine_from_hf(path, device="cpu", quantization="q0f32")


def test_q0f32_matches_transformers(engine_f32, hf_sharded):
    _, reference = hf_sharded
    ta, tb = _run_and_compare(engine_f32, reference, tol=1e-4)
    # The batched run's greedy tokens are HF's greedy continuation of each prompt on its own.
    for prompt, ours in ((PROMPT_A, ta), (PROMPT_B, tb)):
        ref = list(prompt)
        for _ in range(5):
            ref.append(int(hf_last_logits(reference, ref).argmax()))
        assert ours == ref
    # ... and what Engine.generate (one sequence: prefill + single-sequence decode) returns.
    assert engine_f32.generate(PROMPT_A, 5) == ta[len(PROMPT_A):]


def test_pytorch_bin_checkpoint_matches_transformers(hf_bin):
    path, reference = hf_bin
    engine = engine_from_hf(path, device="cpu", quantization="q0f32")
    _run_and_compare(engine, reference, tol=1e-4, steps=2)


def test_q0f16_matches_transformers(hf_sharded):
    # fp16 weights and activations (fp32 logits): 2 layers of fp16 rounding (eps 2^-11 ~ 4.9e-4)
    # accumulate to ~1e-3 here; we hold it to 1e-2 relative.
    path, reference = hf_sharded
    engine = engine_from_hf(path, device="cpu", quantization="q0f16")
    _run_and_compare(engine, reference, tol=1e-2)


def test_q4f16_1_matches_reference_on_dequantized_weights(hf_sharded):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import GPT2LMHeadModel  # pylint: disable=import-outside-toplevel

    path, reference = hf_sharded
    engine = engine_from_hf(path, device="cpu", quantization="q4f16_1")
    # The reference: the same HF model carrying the dequantized 4-bit weights.
    stored = {name: engine.params[i].numpy() for i, name in enumerate(engine.exported.param_names)}
    deq = dequantize_params(stored)
    ref = GPT2LMHeadModel(reference.config).eval()
    state = {}
    for name, value in deq.items():
        hf_name = name
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            value = value.T  # back to Conv1D (in, out)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(value))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith((".attn.bias", ".attn.masked_bias")) for m in missing)
    # The quantized model equals the fp32 reference on its own dequantized weights within fp16
    # error, while those weights really differ from the original ones (checked last).
    _run_and_compare(engine, ref, tol=1e-2)
    orig = load_hf_params(path, engine.config)["transformer.h.0.mlp.c_fc.weight"]
    assert np.abs(deq["transformer.h.0.mlp.c_fc.weight"] - orig).max() > 1e-4  # really quantized


def test_chunked_prefill_matches(hf_sharded, tmp_path):
    """A prompt longer than the prefill chunk runs in chunks and still matches."""
    import json  # pylint: disable=import-outside-toplevel

    path, reference = hf_sharded
    cfg = json.loads((path / "config.json").read_text())
    cfg["prefill_chunk_size"] = 8
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    engine = engine_from_hf(tmp_path, device="cpu", quantization="q0f32")
    assert engine.config.prefill_chunk_size == 8
    ids = list(range(3, 3 + 21))  # 3 chunks: 8 + 8 + 5
    seq = engine.add_sequence()
    ours = engine.prefill(seq, ids)
    assert engine.sequence_length(seq) == 21
    assert rel_err(ours, hf_last_logits(reference, ids)) < 1e-4


def test_generate_is_greedy_like_transformers(engine_f32, hf_sharded):
    import torch  # pylint: disable=import-outside-toplevel

    _, reference = hf_sharded
    ours = engine_f32.generate(PROMPT_B, 6)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([PROMPT_B]), max_new_tokens=6, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)[0, len(PROMPT_B):].tolist()
    assert ours == theirs


def test_context_window_is_a_clear_error(engine_f32):
    window = engine_f32.config.context_window_size
    with pytest.raises(ContextWindowError, match="context window"):
        engine_f32.generate([1] * (window - 2), 5)
    seq = engine_f32.add_sequence()
    engine_f32.prefill(seq, [1] * window)
    with pytest.raises(ContextWindowError, match="context window"):
        engine_f32.decode([seq], [1])
    engine_f32.remove_sequence(seq)


def test_bad_engine_input(engine_f32):
    seq = engine_f32.add_sequence()
    with pytest.raises(EngineError, match="token ids"):
        engine_f32.prefill(seq, [engine_f32.config.vocab_size])
    with pytest.raises(EngineError, match="unknown sequence"):
        engine_f32.decode([seq + 100], [1])
    with pytest.raises(EngineError, match="one token per sequence"):
        engine_f32.decode([seq], [1, 2])
    engine_f32.remove_sequence(seq)


def test_exported_info_from_recorded_metadata_and_bad_metadata():
    """What a cached library opens from (bench's cache hit): the export's own metadata, checked."""
    from gpt2_model.config import get_config  # pylint: disable=import-outside-toplevel
    from gpt2_model.export import export_model, exported_info  # pylint: disable=import-outside-toplevel
    from tuning.targets import make_target  # pylint: disable=import-outside-toplevel

    config = get_config("tiny")
    ex = export_model(config, quantization="q0f16", target=make_target("cpu"))
    info = exported_info(config, json.loads(json.dumps(ex.metadata)))  # as meta.json stores it
    assert info.param_specs() == ex.param_specs() and info.param_names == ex.param_names
    assert info.scheme.name == "q0f16" and info.metadata["buckets"] == ex.metadata["buckets"]
    with pytest.raises(ValueError, match="not the metadata of a GPT-2 export"):
        exported_info(config, {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="does not match the config"):
        exported_info(get_config("gpt2"), ex.metadata)
