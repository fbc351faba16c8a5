"""The step mark (gpt2_model.step_mark): where the model records it, where its copy goes, and when
the engine waits for it instead of the whole previous step. The CUDA side (event captured into the
whole-step graph, greedy generate still equal to HF) is the GPU-marked test in test_decode_loop.py."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from gpt2_model import step_mark
from gpt2_model.config import get_config
from gpt2_model.cuda_graph import StepGraphs
from gpt2_model.export import export_model
from tuning.targets import make_target


@pytest.fixture(scope="module")
def exported():
    return export_model(get_config("tiny"), quantization="q0f32", target=make_target("cpu"),
                        buckets={"decode": [1], "prefill": [8]})


@pytest.mark.parametrize("name", ["prefill", "decode", "batch_decode", "batch_prefill", "batch_decode_b1", "prefill_s8",
                                  "prefill_tokens", "batch_decode_tokens_b1", "prefill_tokens_s8"])
def test_every_step_marks_once_after_its_last_attention_before_the_final_norm(exported, name):
    """Every model step (logits and token entry points, symbolic and bucket) records the mark once,
    after its last attention (the last reader of the KV cache's auxiliary arrays), before the final
    layer norm: lm_head and argmax follow it."""
    lines = exported.mod[name].script().splitlines()
    marks = [i for i, ln in enumerate(lines) if f'"{step_mark.MARK_FUNC}"' in ln]
    attn = [i for i, ln in enumerate(lines) if "attention_with_fused_qkv" in ln]
    norms = [i for i, ln in enumerate(lines) if "R.nn.layer_norm" in ln]
    n_layer = get_config("tiny").n_layer
    assert len(marks) == 1 and len(attn) == n_layer, (name, marks, attn)
    assert attn[-1] < marks[0] < norms[-1]
    assert all(n < marks[0] for n in norms[:-1])  # every layer's norms come before it


def test_the_mark_copies_and_calls_the_recorder_after_the_copy():
    f = tvm.get_global_func(step_mark.MARK_FUNC)
    src = tvm.runtime.tensor(np.arange(12, dtype=np.float32).reshape(1, 3, 4))
    dst = tvm.runtime.tensor(np.zeros((1, 3, 4), np.float32))
    f(src, dst)
    np.testing.assert_array_equal(dst.numpy(), src.numpy())
    seen = []
    other = tvm.runtime.tensor(np.zeros((1, 3, 4), np.float32))
    with step_mark.recording(seen.append):
        f(src, other)
    assert seen == [0]  # after the copy, with the stream it went to (the CPU's: 0)
    np.testing.assert_array_equal(other.numpy(), src.numpy())
    f(src, dst)  # the recorder is gone again
    assert len(seen) == 1


class _FakeCuda:
    def __init__(self):
        self.calls = []

    def record_external(self, event, stream):
        self.calls.append(("record", event, stream))

    def wait_event(self, event):
        self.calls.append(("wait_event", event))

    def sync(self, stream):
        self.calls.append(("sync", stream))


def _graphs(wait_for_mark: bool) -> StepGraphs:
    g = StepGraphs.__new__(StepGraphs)  # the bookkeeping only: no CUDA device here
    g.cuda, g.stream, g.mark_event = _FakeCuda(), 11, 77
    g.marks = g.mark_waits = 0
    g.step_marked = False
    g.wait_for_mark = wait_for_mark
    return g


def test_engine_waits_for_the_mark_only_after_a_step_that_recorded_it():
    g = _graphs(wait_for_mark=True)
    g.wait_previous()  # nothing marked yet: the whole stream
    assert g.cuda.calls == [("sync", 11)]
    before = g.marks
    g.mark(11)
    assert g.cuda.calls[1:] == [("record", 77, 11)]
    g.step_done(before)
    assert g.step_marked
    g.wait_previous()
    assert g.cuda.calls[-1] == ("wait_event", 77) and g.mark_waits == 1 and not g.step_marked
    g.step_done(g.marks)  # a step that recorded nothing (e.g. a library without the mark)
    g.wait_previous()
    assert g.cuda.calls[-1] == ("sync", 11)
    before = g.marks
    g.marks += 1  # a replay of a graph captured with the mark enqueues its mark node (StepGraphs.run)
    g.step_done(before)
    g.wait_previous()
    assert g.cuda.calls[-1] == ("wait_event", 77) and g.mark_waits == 2


def test_mark_waits_are_off_unless_asked():
    g = _graphs(wait_for_mark=False)
    before = g.marks
    g.mark(11)
    g.step_done(before)
    g.wait_previous()
    assert g.cuda.calls[-1] == ("sync", 11) and g.mark_waits == 0
