"""Timing helpers: device events on CUDA, explicit synchronisation on CPU, robust statistics.

Method
------
* **Warm-up** first (``warmup`` calls not recorded): first calls pay for lazy module loading,
  cuBLAS handles, CUDA-graph capture, allocator growth, page faults.
* **Wall time** of a call: ``time.perf_counter`` from before the call to after the device is
  synchronised (so queued GPU work is included). This is the latency a caller sees, Python and
  launch overhead included.
* **GPU time** of a call (CUDA only): elapsed time between two ``torch.cuda.Event`` s recorded on
  the legacy default stream (TVM launches there, and torch's default stream is the legacy
  stream) around the call. To keep host launch gaps out of that figure, the stream is first
  blocked by a short device-side spin (``torch.cuda._sleep``) so the whole call is enqueued
  before the GPU reaches the start event; the spin is lengthened until the host finished
  enqueueing before the start event fired. When the call synchronises internally (a blocking
  host<->device copy) that cannot hold: spinning is switched off, the gaps after the last
  synchronisation are included and ``blocked`` is reported ``False``. Without torch, GPU time
  is not measured (``None``) and only wall time with ``Device.sync()`` is reported.
* **Statistics**: median with 20th/80th percentiles (linear interpolation), robust against the
  occasional preempted sample; every raw sample is kept for the JSON output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Stats", "stats", "Timer", "make_timer", "CallTiming"]


@dataclass(frozen=True)
class Stats:
    """Median and 20th/80th percentiles of a list of samples.

    Attributes
    ----------
    median, p20, p80, mean, min, max : float
    n : int
        Number of samples.
    """

    median: float
    p20: float
    p80: float
    mean: float
    min: float
    max: float
    n: int

    @property
    def spread(self) -> float:
        """Half the p20..p80 range, shown as the ``±`` column."""
        return (self.p80 - self.p20) / 2.0

    def to_dict(self) -> dict[str, float]:
        """JSON form: ``{median, p20, p80, mean, min, max, n}``."""
        return {
            "median": self.median,
            "p20": self.p20,
            "p80": self.p80,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "n": self.n,
        }

    def map(self, fn: Callable[[float], float]) -> "Stats":
        """Statistics of ``fn(x)`` for a *monotone decreasing* ``fn`` (e.g. ms -> tokens/s).

        Percentiles of a monotone transform are the transform of the percentiles; a decreasing
        transform swaps p20 and p80 (and min and max). The mean is transformed as-is (it is not
        the mean of the transformed samples); use :func:`stats` on transformed samples when the
        exact mean matters.
        """
        return Stats(
            median=fn(self.median),
            p20=fn(self.p80),
            p80=fn(self.p20),
            mean=fn(self.mean),
            min=fn(self.max),
            max=fn(self.min),
            n=self.n,
        )


def stats(samples) -> Stats:
    """Summarise samples.

    Parameters
    ----------
    samples : sequence of float
        At least one finite value.

    Returns
    -------
    Stats

    Raises
    ------
    ValueError
        Empty input or non-finite values.
    """
    a = np.asarray(list(samples), dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples to summarise")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"non-finite timing samples: {a.tolist()}")
    p20, p50, p80 = np.percentile(a, [20, 50, 80])
    return Stats(
        median=float(p50),
        p20=float(p20),
        p80=float(p80),
        mean=float(a.mean()),
        min=float(a.min()),
        max=float(a.max()),
        n=int(a.size),
    )


@dataclass
class CallTiming:
    """Timing of one call.

    Attributes
    ----------
    wall_ms : float
        Host wall time including device synchronisation.
    gpu_ms : float or None
        Device time between events (CUDA with torch), else ``None``.
    blocked : bool or None
        Whether the GPU-time measurement managed to enqueue the whole call before the start
        event fired (``None`` when no GPU time was taken).
    """

    wall_ms: float
    gpu_ms: float | None = None
    blocked: bool | None = None


@dataclass
class Timer:
    """Times calls on one device.

    Use :func:`make_timer` to construct one. ``time_call(fn)`` returns a :class:`CallTiming`;
    ``sync()`` waits for all queued work on the device.

    Attributes
    ----------
    kind : str
        ``"cpu"`` or ``"cuda"``.
    index : int
        CUDA ordinal.
    method : str
        ``"perf_counter"`` (CPU), ``"cuda-events"`` (CUDA with torch) or
        ``"sync+perf_counter"`` (CUDA without torch).
    """

    kind: str
    index: int = 0
    method: str = "perf_counter"
    _tvm_dev: Any = None
    _torch: Any = None
    _spin_cycles: int = 2_000_000  # ~1 ms at ~2 GHz; adapted by gpu(), 0 = spinning off
    _grown: int = 0  # times gpu() lengthened the spin
    info: dict[str, Any] = field(default_factory=dict)

    def sync(self) -> None:
        """Block until the device finished all queued work."""
        if self.kind == "cpu":
            return
        if self._torch is not None:
            self._torch.cuda.synchronize(self.index)
        if self._tvm_dev is not None:
            self._tvm_dev.sync()

    def wall(self, fn: Callable[[], Any]) -> float:
        """Wall time of ``fn()`` in ms, synchronising before and after."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def time_call(self, fn: Callable[[], Any], *, gpu: bool = True) -> CallTiming:
        """Time one call: wall time always, GPU time as well when available and ``gpu``.

        GPU time needs a second execution of ``fn`` (with the stream blocked first), so only
        use ``gpu=True`` for idempotent calls; stateful calls (a decode step appends to the KV
        cache) should use :meth:`wall` and :meth:`gpu` on separate passes.
        """
        w = self.wall(fn)
        if gpu and self.method == "cuda-events":
            g, blocked = self.gpu(fn)
            return CallTiming(wall_ms=w, gpu_ms=g, blocked=blocked)
        return CallTiming(wall_ms=w)

    def gpu(self, fn: Callable[[], Any]) -> tuple[float | None, bool | None]:
        """Device time of ``fn()`` in ms via CUDA events, host launch gaps excluded if possible.

        The stream is held by a device-side spin (``torch.cuda._sleep``) while the host enqueues
        ``fn``; ``blocked`` says whether the whole call was enqueued before the start event fired
        (then the figure is pure device time). The spin grows with the observed host issue time.
        If the spin already outlasted the host issue time and the start event still fired first,
        ``fn`` synchronises internally (a blocking copy): spinning cannot help, so it is switched
        off for this timer and the figure includes the host gaps after that synchronisation.

        Returns
        -------
        (gpu_ms, blocked)
            ``(None, None)`` when not on CUDA with torch.
        """
        if self.method != "cuda-events":
            return None, None
        torch = self._torch
        stream = torch.cuda.default_stream(self.index)  # legacy default stream: TVM launches there too
        spin0 = torch.cuda.Event(enable_timing=True)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self.sync()
        spinning = self._spin_cycles > 0
        with torch.cuda.device(self.index), torch.cuda.stream(stream):
            if spinning:
                spin0.record(stream)
                torch.cuda._sleep(self._spin_cycles)  # hold the GPU while the host enqueues fn
            start.record(stream)
            t0 = time.perf_counter()
            fn()
            end.record(stream)
            issue_ms = (time.perf_counter() - t0) * 1e3
            blocked = spinning and not start.query()  # start pending => all of fn was enqueued in time
        end.synchronize()
        ms = float(start.elapsed_time(end))
        if spinning and not blocked:
            spin_ms = float(spin0.elapsed_time(start))
            self._grown += 1
            if spin_ms > issue_ms or self._grown > MAX_SPIN_GROWTH:
                # spun longer than the host needed, or lengthened again and again, and the call
                # still was not enqueued in time: fn synchronises internally (a blocking copy
                # waits for the spin itself, so its issue time always exceeds the spin)
                self._spin_cycles = 0
                self.info["spin"] = "off: the timed call synchronises with the device internally"
            else:  # lengthen: cycles per ms measured on this spin, 3x the issue time, at most ~0.2 s
                # A spin measured at ~0 ms would make the rate, and so the next spin, enormous;
                # clock rates above ~5 GHz are not real, so spins stay <= ~0.2 s.
                per_ms = min(self._spin_cycles / max(spin_ms, 1e-3), MAX_CYCLES_PER_MS)
                self._spin_cycles = int(min(per_ms * 200.0, max(2 * self._spin_cycles, per_ms * 3 * issue_ms)))
        return ms, bool(blocked)


#: Upper bound of the clock rate :meth:`Timer.gpu` assumes for its stream-holding spin (cycles per ms).
MAX_CYCLES_PER_MS = 5_000_000
#: Lengthenings of the spin before it is judged useless (the call blocks on the device).
MAX_SPIN_GROWTH = 4


def make_timer(device) -> Timer:
    """Build a :class:`Timer` for a :class:`bench.env.DeviceSpec`.

    Parameters
    ----------
    device : bench.env.DeviceSpec
        ``kind`` ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    Timer
        On CUDA with a CUDA-enabled torch: CUDA events; on CUDA without torch: synchronise +
        perf_counter; on CPU: perf_counter (TVM's CPU calls are synchronous).
    """
    if device.kind == "cpu":
        return Timer(kind="cpu", method="perf_counter")
    tvm_dev = device.tvm_device()
    try:
        import torch

        if torch.cuda.is_available():
            return Timer(kind="cuda", index=device.index, method="cuda-events", _tvm_dev=tvm_dev, _torch=torch)
    except ImportError:
        pass
    return Timer(kind="cuda", index=device.index, method="sync+perf_counter", _tvm_dev=tvm_dev)
