"""Timing helpers: wall and GPU time of the same pass, robust statistics.

Method
------
* **Warm-up** first (``warmup`` runs not recorded): first calls pay for lazy module loading,
  cuBLAS handles, CUDA-graph capture, allocator growth, page faults.
* **One pass.** Wall time and GPU time come from the *same* execution, so they can be compared:
  the host takes ``time.perf_counter`` before the first CUDA event is recorded and after the
  device is synchronised at the end, hence ``gpu <= wall`` by construction (up to the
  sub-microsecond resolution of the two clocks).
* **Decode steps run back to back** (:meth:`Timer.steps`): the host issues ``n`` steps without
  synchronising between them, as a serving loop would, with a CUDA event recorded on the legacy
  default stream (TVM launches there; torch's default stream is the legacy stream) between steps.
  Wall ms/step = the whole run's wall time / ``n`` (host and device overlap where the step lets
  them: a step that blocks inside, e.g. a synchronous host-to-device copy, shows it here); GPU
  ms/step = the time between consecutive events (the device's timeline, idle gaps waiting for the
  host included). Neither the timing nor the loop makes the host wait for the device mid-run.
* **Single calls** (:meth:`Timer.call`, prefill): events around the call, synchronise, wall time.
* Without torch on CUDA, GPU time is not measured (``None``); on the CPU there is no GPU time.
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
    """Timing of one pass.

    Attributes
    ----------
    wall_ms : float
        Host wall time of the pass, device synchronisation included.
    gpu_ms : list of float or None
        Device time of each call of the pass between CUDA events (CUDA with torch), else ``None``.
        ``sum(gpu_ms) <= wall_ms``.
    """

    wall_ms: float
    gpu_ms: list[float] | None = None


@dataclass
class Timer:
    """Times calls on one device; use :func:`make_timer` to construct one.

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
        return self.steps(fn, 1, gpu=False).wall_ms

    def call(self, fn: Callable[[], Any], *, stream: int | None = None) -> CallTiming:
        """Wall and GPU time of one call of ``fn`` (one execution)."""
        return self.steps(fn, 1, stream=stream)

    def steps(self, fn: Callable[[], Any], n: int, *, gpu: bool = True, stream: int | None = None) -> CallTiming:
        """Run ``fn`` ``n`` times back to back, without synchronising in between.

        ``stream``: the raw CUDA stream ``fn`` launches on, when not the legacy default stream
        (an engine with whole-step graphs): the events are recorded there.

        Returns
        -------
        CallTiming
            ``wall_ms`` of the whole run (synchronised at both ends), ``gpu_ms`` per call from
            events recorded between the calls (``None`` unless CUDA with torch and ``gpu``).
        """
        if n < 1:
            raise ValueError("steps: n must be >= 1")
        use_events = gpu and self.method == "cuda-events"
        self.sync()
        if not use_events:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            self.sync()
            return CallTiming(wall_ms=(time.perf_counter() - t0) * 1e3)
        torch = self._torch
        stream = (torch.cuda.ExternalStream(stream, device=self.index) if stream is not None
                  else torch.cuda.default_stream(self.index))  # legacy default stream: TVM launches there too
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        with torch.cuda.device(self.index), torch.cuda.stream(stream):
            t0 = time.perf_counter()
            events[0].record(stream)
            for i in range(n):
                fn()
                events[i + 1].record(stream)
            events[-1].synchronize()
            self.sync()
            wall = (time.perf_counter() - t0) * 1e3
        return CallTiming(wall_ms=wall, gpu_ms=[float(a.elapsed_time(b)) for a, b in zip(events, events[1:])])


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
