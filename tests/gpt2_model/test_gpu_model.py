"""CUDA builds of preset gpt2 against transformers on the same GPU (marked gpu: skipped without one).

Run on the GPU machine: ``python -m pytest -m gpu tests/gpt2_model/test_gpu_model.py -s``.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_model.quantization import dequantize_params
from tuning.engine import engine_from_hf

pytestmark = pytest.mark.gpu

PROMPTS = ([464, 3290, 318, 257, 1332, 13, 632, 373], [40, 1842])


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """Preset gpt2's config with random weights (no download), saved by transformers."""
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import GPT2Config, GPT2LMHeadModel  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    path = tmp_path_factory.mktemp("gpt2_random")
    model.save_pretrained(str(path))
    return path, model.cuda()


def _logits(model, ids):
    import torch  # pylint: disable=import-outside-toplevel

    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0, -1].float().cpu().numpy()


def _check(engine, model, tol):
    errors = []
    seqs = [engine.add_sequence() for _ in PROMPTS]
    toks = [list(p) for p in PROMPTS]
    logits = [engine.prefill(s, t) for s, t in zip(seqs, toks)]
    for _ in range(5):
        for ours, t in zip(logits, toks):
            ref = _logits(model, t)
            errors.append(float(np.abs(ours - ref).max() / np.abs(ref).max()))
        nxt = [int(np.argmax(x)) for x in logits]
        for t, n in zip(toks, nxt):
            t.append(n)
        logits = list(engine.decode(seqs, nxt))
    for s in seqs:
        engine.remove_sequence(s)
    print(f"{engine.exported.scheme.name}: max rel err {max(errors):.3g} over {len(errors)} checks")
    assert max(errors) < tol, errors
    return errors


def test_cuda_q0f32_matches_transformers(hf_gpt2):
    path, model = hf_gpt2
    engine = engine_from_hf(path, device="cuda", quantization="q0f32")
    # fp32 everywhere; cuBLAS-free TIR reductions in a different order than torch: ~1e-6.
    _check(engine, model, tol=1e-4)


def test_cuda_q0f16_matches_transformers(hf_gpt2):
    path, model = hf_gpt2
    engine = engine_from_hf(path, device="cuda", quantization="q0f16", cuda_graph=True)
    # fp16 weights and activations through 12 layers: held to 2e-2 relative to the fp32 reference.
    _check(engine, model, tol=2e-2)


def test_cuda_q4f16_1_matches_dequantized_reference(hf_gpt2):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import GPT2LMHeadModel  # pylint: disable=import-outside-toplevel

    path, model = hf_gpt2
    engine = engine_from_hf(path, device="cuda", quantization="q4f16_1")
    stored = {n: engine.params[i].numpy() for i, n in enumerate(engine.exported.param_names)}
    state = {}
    for name, value in dequantize_params(stored).items():
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            value = value.T
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    ref = GPT2LMHeadModel(model.config).eval()
    ref.load_state_dict(state, strict=False)
    _check(engine, ref.cuda(), tol=2e-2)
