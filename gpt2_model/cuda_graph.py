"""Whole-step CUDA graphs for the engine's token steps.

A decode step of the token-in/token-out library is one VM call, but inside it the host launches
~30 things (the graphs ``relax.backend.use_cuda_graph`` captured between KV-cache calls, the
embedding, 12 KV-cache attention calls of 3 kernels each, lm_head, argmax): on an H200 the host,
not the GPU, set the pace (0.50 ms per b1 step for 0.19 ms of kernels). Here the *whole* call is
captured once per step shape and replayed with one ``cudaGraphLaunch``.

How it works (:class:`StepGraphs`)
----------------------------------
* **One stream.** The engine gets its own CUDA stream ``S`` (blocking, so the legacy default
  stream that host copies use stays ordered with it). Every library call runs with ``S`` as TVM's
  current stream, and the paged KV cache is created under it, so the cache's kernels (split +
  rotary, append, attention) launch on ``S`` too (the cache keeps the stream it was created on)
  and land in the capture.
* **Stable addresses.** The library must be built with ``relax.backend.use_cuda_graph``: its
  rewrite moves every intermediate of a static-shape function into storage allocated once per VM
  (``vm.builtin.cuda_graph.get_cached_alloc``), so a replay writes where the capture wrote. The
  function's outputs (next ids, logits) come from the VM's pool: the capture-time outputs are kept
  alive for the life of the graph, so the pool never hands those blocks to anyone else.
* **No graphs inside the graph.** The rewrite also wraps the regions between KV-cache calls in
  ``vm.builtin.cuda_graph.run_or_capture``, which replays its own graphs with ``cudaGraphLaunch``
  -- not allowed into a capturing stream (``cudaErrorStreamCaptureUnsupported``, seen on an
  H200). The engine's VM is therefore created while that builtin name resolves to
  :func:`_run_region_directly` (the VM looks builtins up once, when it is created; the original is
  put back right after): each region runs its kernels on the current stream, which the
  whole-step capture records.
* **Inputs.** A graph reads its token ids from a static buffer (``ids`` for decode, one prompt
  buffer per bucket length for prefill) and ends with a captured copy of the next ids into
  ``ids``: the next decode step reads them where they are, with no host round trip.
* **The KV cache's per-step data** (page table, positions) is computed on the host by
  ``begin_forward`` and copied by the cache on its own copy stream into device buffers at offsets
  that depend only on the array lengths. The key of a graph is therefore the step's phase, size,
  pages per sequence and "fresh sequence" flags: a step with the same key has the same buffer
  addresses and kernel arguments, only the values differ. Pages are 16 tokens (what TVM's cache
  kernels are compiled for), so a growing sequence meets a new key every 16 steps: the first
  pass through a length pays one real step + one capture there, every later pass replays.
  Before each replay the engine waits for the previous step (the cache's copy stream does not
  wait for ``S``: see ``Engine._step``) -- by default only for its *step mark* (``GPT2K_STEP_MARK=0``: the whole step),
  an event the step records after its last KV-cache read (:mod:`gpt2_model.step_mark`; captured
  as an event-record node, so replays record it too) -- then flushes the copy
  (``get_query_positions``), which makes ``S`` wait for it; inside the captured call the flush is a
  no-op.
* **First use of a key** runs the step for real (its result is returned), then captures the same
  call (nothing executes during a capture; the KV cache's host state is not changed by an
  attention call), instantiates and caches it. A capture that fails disables graphs for the
  engine with one warning; the step's result is the real run's either way.

Outputs of a replayed step live in the graph's buffers: the next ids (a view of ``ids``) and the
logits are valid until the next step, like the outputs of ``torch.compile(mode="reduce-overhead")``.

The CUDA runtime is reached through ``ctypes`` (``libcudart``, the one TVM's CUDA runtime loads):
TVM's Python API has no stream capture.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_CAPTURE_MODE_RELAXED = 2  # cudaStreamCaptureModeRelaxed: the VM's pool may cudaMalloc mid-capture
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)
_EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming
_EVENT_RECORD_EXTERNAL = 1  # cudaEventRecordExternal: captured as an event-record node
_CAPTURE_ACTIVE = 1  # cudaStreamCaptureStatusActive
#: ``0``: each step waits for the whole previous step; anything else (the default): only for its mark
#: (:mod:`gpt2_model.step_mark`; on an H200, 2026-12-02, wall time per decode step fell to the graph time).
STEP_MARK_ENV = "GPT2K_STEP_MARK"
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


class CudaError(RuntimeError):
    """A CUDA runtime call failed (or no CUDA runtime / device is usable)."""


class CudaRuntime:
    """The few CUDA runtime calls the step graphs need, through ``ctypes``."""

    def __init__(self, device_index: int = 0):
        self.device_index = int(device_index)
        self.lib = _load_cudart()
        v, p, sz, i, u64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_int, \
            ctypes.c_ulonglong
        sig = {
            "cudaSetDevice": [i],
            "cudaStreamCreateWithFlags": [p, ctypes.c_uint],
            "cudaStreamDestroy": [v],
            "cudaStreamSynchronize": [v],
            "cudaStreamBeginCapture": [v, i],
            "cudaStreamEndCapture": [v, p],
            "cudaGraphInstantiateWithFlags": [p, v, u64],
            "cudaGraphLaunch": [v, v],
            "cudaGraphDestroy": [v],
            "cudaGraphExecDestroy": [v],
            "cudaMemcpyAsync": [v, v, sz, i, v],
            "cudaGetLastError": [],
            "cudaEventCreate": [p],
            "cudaEventRecord": [v, v],
            "cudaEventSynchronize": [v],
            "cudaEventElapsedTime": [ctypes.POINTER(ctypes.c_float), v, v],
            "cudaEventDestroy": [v],
            "cudaEventCreateWithFlags": [p, ctypes.c_uint],
            "cudaEventRecordWithFlags": [v, v, ctypes.c_uint],
        }
        for name, args in sig.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self.lib.cudaGetErrorString.argtypes, self.lib.cudaGetErrorString.restype = [i], ctypes.c_char_p

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            msg = self.lib.cudaGetErrorString(err)
            raise CudaError(f"{what} failed: CUDA error {err} ({msg.decode() if msg else '?'})")

    def create_stream(self) -> int:
        """A new blocking stream on the device (ordered with the legacy default stream)."""
        self._check(self.lib.cudaSetDevice(self.device_index), "cudaSetDevice")
        handle = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(handle), 0), "cudaStreamCreate")
        return int(handle.value)

    def destroy_stream(self, stream: int) -> None:
        self._check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def sync(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def begin_capture(self, stream: int) -> None:
        self._check(self.lib.cudaStreamBeginCapture(ctypes.c_void_p(stream), _CAPTURE_MODE_RELAXED),
                    "cudaStreamBeginCapture")

    def end_capture(self, stream: int) -> int:
        """End the capture; the graph (to instantiate or destroy). Raises if the capture broke."""
        graph = ctypes.c_void_p()
        self._check(self.lib.cudaStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph)),
                    "cudaStreamEndCapture")
        return int(graph.value or 0)

    def instantiate(self, graph: int) -> int:
        exe = ctypes.c_void_p()
        try:
            self._check(self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), ctypes.c_void_p(graph), 0),
                        "cudaGraphInstantiate")
        finally:
            self.lib.cudaGraphDestroy(ctypes.c_void_p(graph))
        return int(exe.value)

    def launch(self, exe: int, stream: int) -> None:
        self._check(self.lib.cudaGraphLaunch(ctypes.c_void_p(exe), ctypes.c_void_p(stream)), "cudaGraphLaunch")

    def elapsed_ms(self, stream: int, fn, n: int) -> float:
        """Device time of ``n`` calls of ``fn()`` (launching on ``stream``) between two events, per call."""
        events = [ctypes.c_void_p(), ctypes.c_void_p()]
        for e in events:
            self._check(self.lib.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        try:
            self._check(self.lib.cudaEventRecord(events[0], ctypes.c_void_p(stream)), "cudaEventRecord")
            for _ in range(n):
                fn()
            self._check(self.lib.cudaEventRecord(events[1], ctypes.c_void_p(stream)), "cudaEventRecord")
            self._check(self.lib.cudaEventSynchronize(events[1]), "cudaEventSynchronize")
            ms = ctypes.c_float()
            self._check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), events[0], events[1]), "cudaEventElapsedTime")
            return float(ms.value) / n
        finally:
            for e in events:
                self.lib.cudaEventDestroy(e)

    def create_event(self) -> int:
        """An event without timing (the cheapest to record and wait for)."""
        handle = ctypes.c_void_p()
        self._check(self.lib.cudaEventCreateWithFlags(ctypes.byref(handle), _EVENT_DISABLE_TIMING),
                    "cudaEventCreate")
        return int(handle.value)

    def is_capturing(self, stream: int) -> bool:
        """Whether ``stream`` is being captured into a graph now."""
        status = ctypes.c_int(0)
        self._check(self.lib.cudaStreamIsCapturing(ctypes.c_void_p(stream), ctypes.byref(status)),
                    "cudaStreamIsCapturing")
        return status.value == _CAPTURE_ACTIVE

    def record_external(self, event: int, stream: int) -> None:
        """Record ``event`` on ``stream``; inside a stream capture, as an event-record node of the graph.

        The external flag only where the stream is capturing: on an H200 (2026-12-02) recording
        with it on a stream that was not capturing failed with error 401 (illegal state)."""
        if self.is_capturing(stream):
            self._check(self.lib.cudaEventRecordWithFlags(ctypes.c_void_p(event), ctypes.c_void_p(stream),
                                                          _EVENT_RECORD_EXTERNAL), "cudaEventRecord")
        else:
            self._check(self.lib.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cudaEventRecord")

    def wait_event(self, event: int) -> None:
        self._check(self.lib.cudaEventSynchronize(ctypes.c_void_p(event)), "cudaEventSynchronize")

    def destroy_exec(self, exe: int) -> None:
        self.lib.cudaGraphExecDestroy(ctypes.c_void_p(exe))

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """``cudaMemcpyAsync`` on ``stream`` (host sources are copied before the call returns)."""
        self._check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                             _MEMCPY_DEFAULT, ctypes.c_void_p(stream)), "cudaMemcpyAsync")


def _load_cudart():
    errors = []
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError as err:
            errors.append(f"{name}: {err}")
    raise CudaError("no CUDA runtime library found for CUDA graphs (" + "; ".join(errors) + ")")


_RUN_OR_CAPTURE = "vm.builtin.cuda_graph.run_or_capture"

#: Captured steps kept per engine (least recently used dropped): a key per 16 tokens of context and
#: batch size, each holding its outputs (b x vocab fp32 logits: 6.4 MB at b32 for GPT-2).
MAX_GRAPHS = 256


def _run_region_directly(vm_ctx, capture_func, args, *_):
    """``run_or_capture`` without a graph: call the region's closure (whole-step capture records it)."""
    import tvm  # pylint: disable=import-outside-toplevel

    return tvm.get_global_func("vm.builtin.invoke_closure")(vm_ctx, capture_func, *args)


@contextlib.contextmanager
def regions_without_graphs():
    """While active, a newly created ``relax.VirtualMachine`` runs the ``run_or_capture`` regions
    of a ``use_cuda_graph`` build directly (see the module docstring)."""
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    original = tvm.get_global_func(_RUN_OR_CAPTURE, allow_missing=True)
    tvm_ffi.register_global_func(_RUN_OR_CAPTURE, _run_region_directly, override=True)
    try:
        yield
    finally:
        if original is not None:
            tvm_ffi.register_global_func(_RUN_OR_CAPTURE, original, override=True)


def has_static_storage(executable) -> bool:
    """Whether a library was built with ``relax.backend.use_cuda_graph`` (its intermediates in
    storage allocated once: what whole-step graphs need). Without it a captured step would bake in
    addresses of the VM's pool that later calls hand out again, so the engine refuses graphs for
    it, with a warning, and runs its steps without."""
    from tvm import relax  # pylint: disable=import-outside-toplevel

    try:
        exe = executable if isinstance(executable, relax.VMExecutable) else relax.VMExecutable(executable)
        text = exe.as_text()
    except Exception as err:  # pylint: disable=broad-except  # cannot tell: the safe answer
        logger.warning("cannot read this library's VM code (%s): its steps run without whole-step CUDA graphs", err)
        return False
    if "vm.builtin.cuda_graph.get_cached_alloc" in text:
        return True
    logger.warning("this library was built without relax.backend.use_cuda_graph (cuda_graph=False): its steps run "
                   "without whole-step CUDA graphs; rebuild with cuda_graph=True for them")
    return False


@dataclass
class _Graph:
    exe: int
    keep: Any  # the capture-time outputs: (next ids, logits); kept alive so the pool never reuses them
    logits: Any
    marked: bool = False  # the step recorded its mark during the capture: each replay records it


class StepGraphs:  # pylint: disable=too-many-instance-attributes
    """Captured whole steps of one engine, keyed by step shape (see the module docstring).

    Parameters
    ----------
    device : tvm.runtime.Device
        A CUDA device.
    max_batch_size : int
        Size of the static ids buffer.
    """

    def __init__(self, device, *, max_batch_size: int):
        import tvm  # pylint: disable=import-outside-toplevel
        import tvm_ffi  # pylint: disable=import-outside-toplevel

        self._tvm, self._ffi = tvm, tvm_ffi
        self.device = device
        self.cuda = CudaRuntime(device.index)
        self.stream = self.cuda.create_stream()
        self.enabled = True
        self.ids = tvm.runtime.empty((max(int(max_batch_size), 1),), "int32", device)
        self._prompts: dict[int, Any] = {}
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently used first
        self.captures = 0
        self.replays = 0
        self.last_key: tuple | None = None
        # the step mark (gpt2_model.step_mark): an event recorded after each step's last KV-cache read
        self.mark_event = self.cuda.create_event()
        self.marks = 0  # marks recorded, captured or replayed so far
        self.mark_waits = 0  # steps that waited for the previous step's mark, not the whole step
        self.step_marked = False  # the last step enqueued recorded its mark
        self.wait_for_mark = os.environ.get(STEP_MARK_ENV, "1") != "0"

    def on_stream(self):
        """Context: TVM's current stream on this device is the engine's stream."""
        return self._ffi.use_raw_stream(self.device, self.stream)

    def sync(self) -> None:
        """Wait for everything queued on the engine's stream."""
        self.cuda.sync(self.stream)

    # ------------------------------------------------------------------ the step mark
    @property
    def recorder(self):
        """What the step mark calls during a library call: :meth:`mark` while marks are waited for,
        else None (no event recorded: it would cost host time for nothing)."""
        return self.mark if self.wait_for_mark else None

    def mark(self, stream: int) -> None:
        """The step mark's recorder: record the mark event on ``stream`` (the engine's, which is TVM's
        current one during library calls; captured as a node inside a whole-step capture)."""
        self.cuda.record_external(self.mark_event, stream)
        self.marks += 1

    def step_done(self, marks_before: int) -> None:
        """After a step was enqueued: whether it recorded the mark (``marks_before``: :attr:`marks`
        before it), so that the next step may wait for the mark instead of the whole step."""
        self.step_marked = self.marks > marks_before

    def wait_previous(self) -> None:
        """Wait until the previous step no longer reads the KV cache's auxiliary arrays: for its
        mark (with :attr:`wait_for_mark` and a marked step), else for everything on the stream."""
        if self.wait_for_mark and self.step_marked:
            self.cuda.wait_event(self.mark_event)
            self.mark_waits += 1
        else:
            self.sync()
        self.step_marked = False

    def ids_view(self, n: int):
        return self.ids._create_view((n,), "int32", 0)

    # ------------------------------------------------------------------ inputs
    def load_ids(self, ids, n: int):
        """Put ``n`` token ids (host int32 array or device tensor) into the ids buffer; its view."""
        view = self.ids_view(n)
        self._copy_in(view, ids, n)
        return view

    def load_prompt(self, ids: np.ndarray):
        """Put a prompt chunk into the static buffer of its length; that buffer."""
        n = int(ids.size)
        buf = self._prompts.get(n)
        if buf is None:
            buf = self._prompts[n] = self._tvm.runtime.empty((n,), "int32", self.device)
        self._copy_in(buf, ids, n)
        return buf

    def _copy_in(self, dst, src, n: int) -> None:
        if isinstance(src, np.ndarray):
            host = np.ascontiguousarray(src, dtype=np.int32)
            self.cuda.copy(dst.data_ptr(), host.ctypes.data, 4 * n, self.stream)
            self.cuda.sync(self.stream)  # the host array may go away: the copy is complete on return
        elif src.data_ptr() != dst.data_ptr():
            self.cuda.copy(dst.data_ptr(), src.data_ptr(), 4 * n, self.stream)

    # ------------------------------------------------------------------ steps
    def run(self, key: tuple, call, inp, n_out: int):
        """Replay the graph of ``key`` (or run for real, then capture it); (next ids view, logits).

        ``call(inp)`` runs the library function on ``inp`` and returns (next ids, logits); the
        caller has done ``begin_forward`` and waited for the previous step.
        """
        out_view = self.ids_view(n_out)
        self.last_key = key
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            self.cuda.launch(graph.exe, self.stream)
            self.replays += 1
            self.marks += graph.marked  # the replay records the captured mark node
            return out_view, graph.logits
        next_ids, logits = call(inp)
        self.cuda.copy(out_view.data_ptr(), next_ids.data_ptr(), 4 * n_out, self.stream)
        if self.enabled:
            self._capture(key, call, inp, out_view, n_out)
        return out_view, logits

    def _capture(self, key: tuple, call, inp, out_view, n_out: int) -> None:
        marks = self.marks
        self.cuda.begin_capture(self.stream)
        try:
            next_ids, logits = call(inp)
            self.cuda.copy(out_view.data_ptr(), next_ids.data_ptr(), 4 * n_out, self.stream)
        except Exception as err:  # pylint: disable=broad-except
            self._give_up(key, err, ended=False)
            return
        try:
            exe = self.cuda.instantiate(self.cuda.end_capture(self.stream))
        except CudaError as err:
            self._give_up(key, err, ended=True)
            return
        self._graphs[key] = _Graph(exe=exe, keep=(next_ids, logits), logits=logits, marked=self.marks > marks)
        self.captures += 1
        while len(self._graphs) > MAX_GRAPHS:  # never replayed again: its buffers may go back to the pool
            _, old = self._graphs.popitem(last=False)
            self.cuda.destroy_exec(old.exe)

    def _give_up(self, key: tuple, err: Exception, *, ended: bool) -> None:
        if not ended:
            try:
                graph = self.cuda.end_capture(self.stream)
                if graph:
                    self.cuda.lib.cudaGraphDestroy(ctypes.c_void_p(graph))
            except CudaError:
                pass
        self.enabled = False
        self.cuda.lib.cudaGetLastError()  # clear the capture's error, or the next CUDA user (torch) reports it
        logger.warning("CUDA graph capture of step %s failed (%s): this engine runs its steps without "
                       "whole-step graphs from now on", key, err)

    def replay_ms(self, n: int = 20, warmup: int = 3) -> float | None:
        """Device ms of the last step's graph replayed ``n`` times back to back (no host work in
        between): what the step costs the GPU. None if the last step has no graph.

        The replays re-run the last step on the same KV-cache positions (the same prompt for a
        prefill; for a decode, the ids each replay leaves behind): use it at the end of a run,
        before the sequences are removed."""
        graph = self._graphs.get(self.last_key) if self.last_key is not None else None
        if graph is None:
            return None
        self.sync()
        for _ in range(warmup):
            self.cuda.launch(graph.exe, self.stream)
        return self.cuda.elapsed_ms(self.stream, lambda: self.cuda.launch(graph.exe, self.stream), n)

    def close(self) -> None:
        for graph in self._graphs.values():
            self.cuda.destroy_exec(graph.exe)
        self._graphs.clear()
        if self.mark_event:
            self.cuda.lib.cudaEventDestroy(ctypes.c_void_p(self.mark_event))
            self.mark_event = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass


class IdHistory:
    """The ids of a single-sequence device loop, kept on the device until the host asks.

    Without graphs each step's ids are their own tensor; in graph mode a step's ids live in the
    graph's buffer until the next step, so each is copied (on the engine's stream, no host wait)
    into one device array."""

    def __init__(self, engine, n: int):
        import tvm  # pylint: disable=import-outside-toplevel

        self._tvm = tvm
        self.engine, self.count = engine, 0
        self._tensors: list = []
        self._buf = self._tvm.runtime.empty((max(n, 1),), "int32", engine.device) if engine.graphs else None

    def add(self, ids):
        if self._buf is None:
            self._tensors.append(ids)
        else:
            g = self.engine.graphs
            g.cuda.copy(self._buf.data_ptr() + 4 * self.count, ids.data_ptr(), 4, g.stream)
        self.count += 1
        return ids

    def host(self, start: int, stop: int) -> np.ndarray:
        """Ids of steps ``start .. stop-1`` on the host (waits for the device)."""
        if self._buf is None:
            return np.concatenate([t.numpy().reshape(-1) for t in self._tensors[start:stop]]).astype(np.int64)
        self.engine.synchronize()
        return self._buf.numpy()[start:stop].astype(np.int64)
