"""The step mark: a point of every model step, after the last layer's attention, that the host can
wait for instead of the whole step (issue 11: host and device overlap).

Why: TVM's paged KV cache copies a step's auxiliary arrays (page table, positions) on its own copy
stream, which never waits for the compute stream, into the buffers the previous step's kernels
read. So before that copy the host must know the previous step no longer reads them. Waiting for
the whole previous step leaves the GPU idle while the host flushes the copy and launches the next
step (~55 µs per decode step on an H200, 2026-12-02). The last reader of those arrays is the last
layer's attention: what follows (the final layer norm, lm_head, argmax: ~30 µs of GPU at b1) never
touches them. Waiting for a mark placed there lets the host's flush and launch overlap that tail.

How: the model (:class:`gpt2_model.model.GPT2Model`) passes the transformer's output through the
extern function :data:`MARK_FUNC` (``op.extern``, a copy of ``b x s x n_embd`` values into the
next layer norm's input). Registered here (the VM resolves it when created, so the runtime imports
this module), it copies on the device's *current* stream (CUDA: ``cudaMemcpyAsync`` on TVM's current
stream, so a capture on that stream -- the engine's whole-step graphs, or the graph regions of
``relax.backend.use_cuda_graph``, which contain the call in static-shape functions -- records the
copy; CPU: a plain copy) and then, with a *recorder* installed (a CUDA engine's
:class:`~gpt2_model.cuda_graph.StepGraphs`, for the duration of each library call), lets it record
its event on that stream: captured as an event-record node, so every replay records it too.

Whether the engine waits for the mark or for the whole step is
:attr:`gpt2_model.cuda_graph.StepGraphs.wait_for_mark`: on by default (measured on an H200,
2026-12-02: wall time per decode step 0.306 / 0.421 / 0.548 ms at b1 / b8 / b32 without it, 0.284 /
0.398 / 0.523 with it, graph time 0.28 / 0.40 / 0.52); ``GPT2K_STEP_MARK=0`` waits for the whole
step. The recorder is installed only while marks are waited for (an event record costs host time).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import numpy as np
import tvm_ffi

from .cuda_graph import CudaRuntime

#: The extern function's global name (the library calls it by this name).
MARK_FUNC = "gpt2k.step_mark"

_local = threading.local()


@contextlib.contextmanager
def recording(recorder: Callable | None):
    """While active (in this thread), :data:`MARK_FUNC` calls ``recorder(stream)`` (if not None)
    after its copy, with the stream the copy went to."""
    previous = getattr(_local, "recorder", None)
    _local.recorder = recorder
    try:
        yield
    finally:
        _local.recorder = previous


_CPU = tvm_ffi.device("cpu").dlpack_device_type()


@functools.lru_cache(maxsize=None)
def _cudart(index: int) -> CudaRuntime:
    return CudaRuntime(index)


def _step_mark(src, dst) -> None:
    dev = src.device
    if dev.dlpack_device_type() == _CPU:
        dst.copyfrom(src)
        stream = 0
    else:
        stream = int(tvm_ffi.get_raw_stream(dev) or 0)
        cuda = _cudart(dev.index)
        nbytes = int(np.prod([int(d) for d in src.shape])) * np.dtype(str(src.dtype)).itemsize
        cuda.copy(dst.data_ptr(), src.data_ptr(), nbytes, stream)
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder(stream)


tvm_ffi.register_global_func(MARK_FUNC, _step_mark, override=True)
