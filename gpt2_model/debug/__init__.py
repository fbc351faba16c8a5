"""Debugging a compiled GPT-2: kernel dumps, layer-by-layer checks against Hugging Face, build diffs.

The workflow follows MLC-LLM's DebugChat: run the compiled library and record the arguments of
every kernel call, then compare the recorded values with a reference.

``gpt2k debug-chat``
    Greedy generation that writes ``DIR/prefill/``, ``DIR/decode_1/``, ... with one
    ``f{i}_{kernel}.npz`` per kernel call (``arg_0`` ... ``arg_N``: every argument after the call;
    destination-passing style, so the last argument is the output), ``logits.npz`` and a
    ``manifest.json`` naming each call's kernel and which arguments are model parameters.
``gpt2k compare-hf``
    The same prompt through ``transformers.GPT2LMHeadModel`` (forward hooks) and our build; a
    table of max-abs and relative error per layer (embeddings, each block's ln_1 / c_attn /
    attention / attention output / ln_2 / c_fc+GELU / MLP output / block output, ln_f, logits),
    the first row beyond tolerance marked. Kernels are matched to layers by the parameters they
    read, not by kernel name (see :mod:`gpt2_model.debug.compare`).
``gpt2k compare-builds``
    Two libraries of one model (e.g. untuned vs tuned) on identical inputs, kernel by kernel. Each
    kernel of build B is also re-run on the inputs *recorded from build A*, so the first failing
    row is the kernel that is itself wrong, not one that received a propagated difference.

How the recording works: the relax VM calls an *instrument* callback before and after every call
instruction (``VirtualMachine.set_instrument``); after each call of a TIR kernel (and of the KV
cache's ``attention_with_fused_qkv``) we copy its arguments to NumPy. The library is not rebuilt
and runs unchanged; VM bookkeeping calls (``vm.builtin.*``, shape functions) are skipped.

Printing from inside the model (``op.print_``)
----------------------------------------------
``tvm.relax.frontend.nn.op.print_(tensor)`` prints a tensor at run time (through
``vm.builtin.debug_print``, i.e. Python ``print`` with the source line). Export with
``export_model(..., debug=True)``: every compute function is then exported with
``effect_mode="packed"`` (it takes the IO effects from ``_initialize_effect`` after its inputs and
returns ``(outputs, effects)``), and :class:`~gpt2_model.runtime.Engine` threads the effects
through each call, so the normal API prints. Without ``debug=True`` the export of a model that
prints fails with ``Var _io is not defined``::

    class PrintingGPT2(GPT2LMHeadModel):
        def batch_decode(self, input_embeds, paged_kv_cache):
            hidden = self.transformer(input_embeds, paged_kv_cache)
            op.print_(hidden)                      # prints shape, dtype and values each call
            return self._lm_head(hidden), paged_kv_cache

    exported = export_model(config, quantization="q0f32", target=target, debug=True,
                            model_cls=PrintingGPT2)
    engine = Engine(exported=exported, executable=build(exported, target=target), params=params)
    engine.decode([seq], [token])                  # prints the ln_f output

``tests/gpt2_model/test_debug.py::test_op_print_in_model`` builds and runs exactly this and checks the printed
values against the ln_f kernel output recorded by the instrument.

Python API: :class:`DebugChat`, :func:`trace`, :class:`KernelRecorder`, :func:`compare_hf`,
:func:`compare_builds`, :func:`compare_dumps`, :func:`load_dump`.
"""

from .chat import DebugChat, DebugChatResult, load_engine, load_tokenizer
from .compare import (
    BUILD_RTOL,
    HF_RTOL,
    Comparison,
    Row,
    compare_builds,
    compare_dumps,
    compare_hf,
    engine_activations,
    hf_activations,
)
from .dump import DebugError, KernelCall, KernelRecorder, Step, load_dump, load_step, save_step, trace

__all__ = [
    "BUILD_RTOL", "HF_RTOL", "Comparison", "DebugChat", "DebugChatResult", "DebugError", "KernelCall",
    "KernelRecorder", "Row", "Step", "compare_builds", "compare_dumps", "compare_hf", "engine_activations",
    "hf_activations", "load_dump", "load_engine", "load_step", "load_tokenizer",
    "save_step", "trace",
]
