"""The gpt-fast-style peer (bench/gptfast.py) against transformers.GPT2LMHeadModel, same weights."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_model.config import get_config
from gpt2_model.loader import load_hf_params

from ..conftest import has_cuda, hf_last_logits, rel_err

torch = pytest.importorskip("torch")
gptfast = pytest.importorskip("bench.gptfast")

PROMPTS = np.array([[5, 17, 300, 2, 999, 4, 8, 1000, 42], [7, 1, 2, 650, 3, 3, 90, 12, 400]], np.int64)


@pytest.fixture(scope="module")
def checkpoint(hf_sharded):
    path, reference = hf_sharded
    config = get_config(path)
    return config, load_hf_params(path, config), reference


def _hf_generate(reference, prompts: np.ndarray, n: int) -> np.ndarray:
    with torch.no_grad():
        out = reference.generate(torch.tensor(prompts), max_new_tokens=n, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, attention_mask=torch.ones(prompts.shape, dtype=torch.long))
    return out[:, prompts.shape[1]:].numpy()


def test_eager_logits_equal_hf(checkpoint):
    """fp32 on CPU, one batch of two prompts: last-position logits within 1e-4 of HF's."""
    config, params, reference = checkpoint
    runner = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=False)
    ours = runner.logits(PROMPTS)
    assert ours.shape == (2, config.vocab_size) and ours.dtype == np.float32
    for row, prompt in zip(ours, PROMPTS):
        assert rel_err(row, hf_last_logits(reference, prompt.tolist())) < 1e-4
    prefill = gptfast.GptFastPrefillRunner(config, params, dtype="float32", device="cpu", compiled=False)
    assert np.array_equal(prefill.logits(PROMPTS[:1, :4]), runner.logits(PROMPTS[:1, :4]))


def test_eager_greedy_tokens_equal_hf_generate(checkpoint):
    """Batched decode through the static cache (positions written in place, causal mask over the
    whole cache): the greedy tokens HF generate returns, for 2 prompts x 12 tokens."""
    config, params, reference = checkpoint
    runner = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=False)
    ours = runner.generate(PROMPTS, 12)
    assert ours.shape == (2, 12)
    assert np.array_equal(ours, _hf_generate(reference, PROMPTS, 12))
    # a second run reuses the cache buffers (zeroed in place): same tokens
    assert np.array_equal(runner.generate(PROMPTS, 12), ours)


def test_eager_decode_steps_teacher_forced_equal_hf(checkpoint):
    """One-token steps at positions 9..13 with chosen (not greedy) tokens: each step's logits
    equal HF's on the whole prefix (the random checkpoint's greedy output repeats one token)."""
    config, params, reference = checkpoint
    runner = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=False)
    model = runner.model
    forced = np.array([[3, 500, 77, 1000, 9], [42, 42, 0, 8, 611]], np.int64)
    model.setup_cache(2, PROMPTS.shape[1] + forced.shape[1])
    with torch.inference_mode():
        model(torch.tensor(PROMPTS), torch.arange(PROMPTS.shape[1]))
        for t in range(forced.shape[1]):
            logits = model(torch.tensor(forced[:, t:t + 1]), torch.tensor([PROMPTS.shape[1] + t])).numpy()
            for row in range(2):
                prefix = PROMPTS[row].tolist() + forced[row, :t + 1].tolist()
                assert rel_err(logits[row], hf_last_logits(reference, prefix)) < 1e-4


def test_runner_interface(checkpoint):
    config, params, _ = checkpoint
    runner = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=False)
    assert runner.weight_bytes == sum(v.size * 4 for k, v in params.items() if not k.endswith("wpe.weight"))
    assert runner.kv_bytes_per_token == 2 * config.n_layer * config.n_embd * 4
    runner.start(batch=3, prompt_len=5, gen_len=4)
    steps = [runner.step() for _ in range(4)]
    assert all(tuple(s.shape) == (3, 1) for s in steps)
    with pytest.raises(RuntimeError, match="holds 9 positions"):
        runner.step()
    runner.stop()
    with pytest.raises(RuntimeError, match="start"):
        runner.step()
    with pytest.raises(ValueError, match="exceed n_positions"):
        runner.start(batch=1, prompt_len=config.n_positions, gen_len=1)
    prefill = gptfast.GptFastPrefillRunner(config, params, dtype="float32", device="cpu", compiled=False)
    prefill.prepare(batch=2, seq_len=7)
    logits = prefill.run()
    assert tuple(logits.shape) == (2, config.vocab_size) and torch.isfinite(logits).all()
    prefill.cleanup()
    with pytest.raises(ValueError, match="batch, seq_len"):
        runner.logits(np.array([1, 2, 3]))


def test_sdpa_choices_and_options(checkpoint):
    """Every SDPA choice of the decode and the prefill gives HF's greedy tokens (eager, CPU);
    unknown choices are refused; one module class for every model (dynamo guards on the type)."""
    config, params, reference = checkpoint
    expected = _hf_generate(reference, PROMPTS, 6)
    for choice in gptfast.SDPA_CHOICES:
        runner = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=False,
                                             decode_sdpa=choice, prefill_sdpa=choice)
        assert np.array_equal(runner.generate(PROMPTS, 6), expected), choice
    assert type(runner.model) is type(gptfast.GptFast(config, params, dtype="float32", device="cpu"))
    with pytest.raises(ValueError, match="SDPA choice"):
        gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=False, decode_sdpa="x")


def test_compiled_on_cpu_no_recompiles_or_graph_breaks(checkpoint):
    """torch.compile (inductor on the CPU, fullgraph): HF's greedy tokens, and exactly one graph per
    shape: a prefill and a decode step per batch size, none per step or per run (the step's inputs
    stay the same kind of tensor, input_pos is a device tensor), none for a second runner of the
    same shapes, no graph break."""
    from torch._dynamo.utils import counters

    config, params, reference = checkpoint
    torch._dynamo.reset()  # pylint: disable=protected-access
    counters.clear()
    runner = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=True)
    expected = _hf_generate(reference, PROMPTS, 8)
    assert np.array_equal(runner.generate(PROMPTS, 8), expected)
    assert np.array_equal(runner.generate(PROMPTS, 8), expected)  # a second run: same cache shape
    assert counters["stats"]["unique_graphs"] == 2  # prefill (2, 9) + decode (2, 1) over a 16-position cache
    runner.generate(PROMPTS[:1], 8)  # batch 1: one more prefill and decode graph
    assert counters["stats"]["unique_graphs"] == 4
    other = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cpu", compiled=True)
    assert np.array_equal(other.generate(PROMPTS, 8), expected)
    assert counters["stats"]["unique_graphs"] == 4
    assert not counters["graph_break"]
    prefill = gptfast.GptFastPrefillRunner(config, params, dtype="float32", device="cpu", compiled=True)
    prefill.prepare(batch=2, seq_len=9)
    ids = prefill._ids.numpy()  # pylint: disable=protected-access - the random prompts it timed
    logits = prefill.run().numpy()
    prefill.cleanup()
    assert counters["stats"]["unique_graphs"] == 5  # the cache sized to the prompt: a new shape
    for row, prompt in zip(logits, ids):
        assert rel_err(row, hf_last_logits(reference, prompt.tolist())) < 1e-4
    assert not counters["graph_break"]


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
def test_compiled_on_cuda_equals_hf_generate(checkpoint):
    """reduce-overhead + fullgraph on CUDA (fp32): HF's greedy tokens, and the logits check."""
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    config, params, reference = checkpoint
    runner = gptfast.GptFastDecodeRunner(config, params, dtype="float32", device="cuda", compiled=True)
    assert np.array_equal(runner.generate(PROMPTS, 12), _hf_generate(reference, PROMPTS, 12))
    assert rel_err(runner.logits(PROMPTS)[0], hf_last_logits(reference, PROMPTS[0].tolist())) < 1e-4
