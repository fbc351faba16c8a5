"""Kernel time from CUDA-graph replays: no host launch cost in the figure.

``time_evaluator`` times a kernel with its launch: on a Hopper box that puts a floor of ~4-5 µs under
every kernel, so kernels of a few µs (a decode step's attention, its GEMVs) cannot be told apart by it.
Here ``iters`` back-to-back calls are captured in one CUDA graph (TVM pointed at torch's capture stream
with ``tvm_ffi.use_torch_stream``) and each replay is timed with CUDA events: the kernels' time as a
whole-step graph runs them. Needs torch with CUDA; :func:`graph_timer_available` says whether it is here.
Used by ``bench`` (kernel tables, step anatomy) and by the template searches (:func:`kernel_us`).
"""

from __future__ import annotations

__all__ = ["COLD_BYTES", "TIMERS", "TIMER_ENV", "cold_copies", "cuda_graph_us", "graph_timer_available", "kernel_us",
           "resolve_timer", "tvm_graph_us"]

#: With ``cold``, the captured calls rotate over copies of the arguments until they span this many
#: bytes: more than twice a Hopper's L2 (50 MB on an H100, 60 MB on an H200), so each call reads its
#: inputs from HBM, as a decode step's kernels do (each weight and each layer's KV read once a step).
#: Timed alone on the same inputs, a 5 MB GEMV runs from L2: 2026-12-07, H100, b8 c_fc2 5.1 µs alone
#: against 6.4 µs in the step, decode attention 4.5 against 6.4 µs.
COLD_BYTES = 128 << 20


def graph_timer_available() -> bool:
    """Whether torch with a CUDA device is importable here (what :func:`cuda_graph_us` needs)."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def cuda_graph_us(f, *, device: str, repeats: int = 20, warmup: int = 5, iters: int = 20,
                  tvm_stream: bool = False) -> list[float]:
    """Microseconds per call of ``f`` from CUDA-graph replays: ``iters`` back-to-back calls are
    captured in one graph, and each of ``repeats`` replays is timed with events.

    With ``tvm_stream`` the calls are TVM functions: TVM is pointed at torch's capture stream
    (``tvm_ffi.use_torch_stream``), so its kernel launches land in the graph. This is how TVM
    kernels and cuBLAS are compared on equal terms (no host launch cost in either).
    """
    import torch

    def ctx(c):
        if not tvm_stream:
            return c
        import tvm_ffi

        return tvm_ffi.use_torch_stream(c)

    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with ctx(torch.cuda.stream(stream)):  # warm up (handles, workspaces) outside the capture
        for _ in range(warmup):
            f()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with ctx(torch.cuda.graph(graph)):
        for _ in range(iters):
            f()
    graph.replay()
    torch.cuda.synchronize(device)
    out = []
    for _ in range(repeats):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / iters)
    return out


#: How the template searches time a kernel: ``cuda-graph`` (:func:`cuda_graph_us`) or ``time_evaluator``
#: (TVM's, launch included). ``auto``: the graph where :func:`graph_timer_available`, unless
#: ``GPT2K_SEARCH_TIMER`` names one of the two.
TIMERS = ("auto", "cuda-graph", "time_evaluator")
TIMER_ENV = "GPT2K_SEARCH_TIMER"


def resolve_timer(timer: str = "auto", device=None) -> str:
    """The timer ``timer`` means here: ``cuda-graph`` or ``time_evaluator`` (a non-CUDA ``device``: always
    the latter). Raises ValueError for anything but :data:`TIMERS` (the environment's value included)."""
    import os  # pylint: disable=import-outside-toplevel

    if timer == "auto":
        timer = os.environ.get(TIMER_ENV, "").strip() or "auto"
        where = f"{TIMER_ENV}={timer!r}"
    else:
        where = f"timer {timer!r}"
    if timer not in TIMERS:
        raise ValueError(f"{where}: the timer must be one of {', '.join(TIMERS)}")
    cuda = device is None or int(device.dlpack_device_type()) == 2  # kDLCUDA
    if timer == "auto":
        timer = "cuda-graph" if cuda and graph_timer_available() else "time_evaluator"
    return timer if cuda else "time_evaluator"


def cold_copies(args, *, iters: int = 20, budget: int = COLD_BYTES) -> list[list]:
    """Argument lists for ``iters`` calls spanning at least ``budget`` bytes where ``iters`` copies can:
    the first is ``args``, the others copy its tensors on their device (other values shared)."""
    is_tensor = [hasattr(a, "copyto") and hasattr(a, "shape") for a in args]
    nbytes = sum(_numel(a.shape) * _itemsize(a.dtype) for a, t in zip(args, is_tensor) if t)
    n = max(1, min(iters, -(-budget // max(nbytes, 1))))
    return [list(args)] + [[a.copyto(a.device) if t else a for a, t in zip(args, is_tensor)] for _ in range(n - 1)]


def tvm_graph_us(fn, args, *, device: str, repeats: int = 20, cold: bool = False) -> list[float]:
    """:func:`cuda_graph_us` of the TVM function call ``fn(*args)`` (TVM launching on torch's capture
    stream); with ``cold`` the captured calls rotate over :func:`cold_copies` of ``args``."""
    import itertools  # pylint: disable=import-outside-toplevel

    sets = itertools.cycle(cold_copies(args) if cold else [args])
    return cuda_graph_us(lambda: fn(*next(sets)), device=device, repeats=repeats, tvm_stream=True)


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _itemsize(dtype) -> int:
    import numpy as np  # pylint: disable=import-outside-toplevel

    return np.dtype(str(dtype)).itemsize


def kernel_us(lib, args, *, device, number: int = 100, repeat: int = 5, timer: str = "auto",
              entry: str = "main", cold: bool = False) -> tuple[float, str]:
    """(median µs per call of ``lib[entry](*args)``, the timer used: :func:`resolve_timer`).

    ``cuda-graph``: ``repeat`` replays of a graph of 20 back-to-back calls (a host part of the call, such as
    a TMA descriptor's encoding, runs once, at capture, as in the model's graphs); with ``cold`` the calls
    rotate over copies of the arguments (:func:`cold_copies`), so none finds its inputs in L2.
    ``time_evaluator``: ``repeat`` runs of ``number`` calls, each with its launch (``cold`` ignored)."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    timer = resolve_timer(timer, device)
    if timer == "cuda-graph":
        us = tvm_graph_us(lib[entry], args, device=f"cuda:{device.index}", repeats=repeat, cold=cold)
        return float(np.median(us)), timer
    te = lib.time_evaluator(entry, device, number=number, repeat=repeat)
    return float(np.median(te(*args).results) * 1e6), timer
