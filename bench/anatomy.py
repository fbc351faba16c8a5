"""Step anatomy: what a decode step (or a prefill) costs against what its kernels cost.

For each TVM variant and test point the row gets

``ms``           wall ms per step (host and device, :meth:`bench.timing.Timer.steps`)
``gpu_ms``       GPU ms per step from CUDA events in the same pass (host not blocked by the timing)
``kernels_ms``   the sum over the step's kernels of ``calls x time per call``, each kernel timed on
                 its own as the library runs it: captured in a CUDA graph and replayed on CUDA
                 (no launch cost, the cuBLAS column's method, ``bench kernels``; a decode step's
                 kernels rotate over copies of their inputs larger than L2, as in the step, where
                 each weight is read once), TVM's ``time_evaluator`` on the CPU
``overhead_ms``  ``ms - kernels_ms``: host work, launch gaps, synchronous copies, and the kernels
                 the partition does not contain (see below)

The kernels are the partition's tasks at the step's bucket (``tuning.partition``): the untuned
variant's are the symbolic-shape kernels under dlight, the tuned variant's the database's
schedules where it has a record. The paged KV cache's own kernels (attention, append, its
auxiliary copies) are pre-built by TVM and not in the partition: their time is inside
``overhead_ms``, which the row says. PyTorch peers get wall and GPU time only.
"""

from __future__ import annotations

from typing import Any, Callable

from .checks import first_line
from .config import TORCH_VARIANTS
from .loop import chunk_lengths
from .timing import stats

__all__ = ["StepAnatomy", "EXCLUDED", "make_anatomy", "run_notes"]

EXCLUDED = "the paged KV cache's own kernels (attention, KV append, auxiliary copies) are not in the kernel sum"


class StepAnatomy:
    """Per-(variant, phase, bucket) kernel sums, computed once and reused across test points.

    Parameters
    ----------
    s : bench.setup.Setup
    log : callable
    """

    def __init__(self, s, *, log: Callable[[str], None]):
        self.s = s
        self.log = log
        self._sums: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._untuned_us: dict[tuple[str, int, str], float] = {}

    @property
    def method(self) -> str:
        """How each kernel is timed on this device."""
        if self.s.device.kind == "cuda" and self.s.timer.method == "cuda-events":
            return "cuda-graph replay"
        return "time_evaluator"


    def _time(self, lib, args, task) -> float:
        """Microseconds per call of one compiled kernel."""
        from .kernels import time_kernel
        from tuning.graph_timer import tvm_graph_us

        s = self.s
        if self.method == "cuda-graph replay":
            # a decode step reads each weight (and each layer's KV) once: its kernels are timed cold
            return stats(tvm_graph_us(lib["main"], args, device=s.device.name, repeats=10,
                                      cold=task.phase == "decode")).median
        return stats(time_kernel(lib, args, device=s.device.tvm_device(), repeats=3,
                                 min_repeat_ms=10 if s.device.kind == "cuda" else 1)).median

    def kernel_sum(self, variant: str, phase: str, bucket: int) -> dict[str, Any]:
        """``{"us", "kernels", "calls", "tuned", "tuned_us"}`` of one step at one bucket."""
        key = (variant, phase, bucket)
        if key in self._sums:
            return self._sums[key]
        from tuning.apply import apply_database

        from .kernels import bucket_tasks, compile_kernel, random_args, untuned_kernel

        s = self.s
        tasks, prepared = bucket_tasks(s.config, quantization=s.quantization, target=s.target, phase=phase,
                                       bucket=bucket)
        tdb = s.database.db if variant == "tuned" and s.database is not None else None
        db = tdb.ms if tdb is not None else None  # the records, for MetaSchedule's queries
        untuned_ref = tdb.untuned_us if tdb is not None else {}
        tdev = s.device.tvm_device()
        total = tuned_us = 0.0
        calls = n_tuned = 0
        for i, task in enumerate(tasks):
            args = random_args(task.func, device=tdev, seed=s.seed + i)
            record = False
            if db is not None:
                mod, applied = apply_database(prepared, database=db, target=s.target, task_list=[task],
                                              untuned_us=untuned_ref)
                record = task.kernel in applied
            ukey = (phase, bucket, task.kernel)
            if record:
                us = self._time(compile_kernel(mod[task.kernel], s.target), args, task)
                n_tuned += 1
                tuned_us += task.weight * us
            elif ukey in self._untuned_us:
                us = self._untuned_us[ukey]
            else:
                us = self._untuned_us[ukey] = self._time(untuned_kernel(task, prepared=prepared, target=s.target),
                                                         args, task)
            total += task.weight * us
            calls += int(task.weight)
        out = {"us": total, "kernels": len(tasks), "calls": calls,
               "tuned": n_tuned if variant == "tuned" else None,
               "tuned_share": (tuned_us / total if total else 0.0) if variant == "tuned" else None}
        self._sums[key] = out
        return out

    def __call__(self, variant: str, p: dict, m: dict, notes: list[str]) -> dict[str, Any] | None:
        """The ``anatomy`` field of one row (``None`` for PyTorch peers or when timing failed)."""
        if variant in TORCH_VARIANTS:
            return None
        s = self.s
        try:
            if p["phase"] == "decode":
                parts = [(self.kernel_sum(variant, "decode", p["batch"]), 1)]
            else:
                chunk = s.config.prefill_chunk_size
                n = p["seq_len"]
                counts = {chunk: n // chunk} if n >= chunk else {}
                if n % chunk:
                    counts[n % chunk] = 1
                assert set(counts) == chunk_lengths(s.config, n)
                parts = [(self.kernel_sum(variant, "prefill", length), p["batch"] * c)
                         for length, c in counts.items()]
        except Exception as e:  # noqa: BLE001 - the anatomy is extra; its failure is a note
            notes.append(f"step anatomy not measured: {first_line(e)}")
            self.log(f"{variant}: step anatomy failed: {first_line(e)}")
            return None
        kernels_ms = sum(k["us"] * c for k, c in parts) / 1e3
        wall = m["ms"].median
        out = {
            "wall_ms": wall,
            "gpu_ms": m["gpu_ms"].median if m["gpu_ms"] else None,
            "kernels_ms": kernels_ms,
            "overhead_ms": wall - kernels_ms,
            "kernels": sum(k["kernels"] for k, _ in parts),
            "calls": sum(k["calls"] * c for k, c in parts),
            "tuned": sum(k["tuned"] for k, _ in parts) if variant == "tuned" else None,
            "tuned_share": (sum(k["tuned_share"] * k["us"] * c for k, c in parts) / max(kernels_ms * 1e3, 1e-12))
            if variant == "tuned" else None,
            "method": self.method,
            "excludes": EXCLUDED,
        }
        if out["overhead_ms"] < 0:
            notes.append("kernels timed alone sum to more than the step's wall time (negative overhead): each "
                         "kernel's own timing (cold inputs, contention on a busy machine) exceeds its share "
                         "inside the step")
        if m["gpu_ms"] is None:
            out["gpu_note"] = ("no GPU time on the CPU" if s.device.kind == "cpu"
                               else "no GPU time: torch with CUDA is needed for events")
        return out


def make_anatomy(s, cfg, log) -> "StepAnatomy | None":
    """A :class:`StepAnatomy` for the run, or ``None`` with ``--no-anatomy``."""
    return StepAnatomy(s, log=log) if cfg.anatomy else None


def run_notes(s, cfg) -> list[str]:
    """Run-level notes on what the timing could and could not measure here."""
    notes = []
    if s.device.kind == "cpu":
        notes.append("CPU: no GPU time (wall time only); CUDA graphs do not apply")
    elif s.timer.method != "cuda-events":
        notes.append("GPU time needs torch with CUDA (events): wall time only")
    if cfg.anatomy:
        cold = (" (a decode step's cold: inputs rotated over copies larger than L2)"
                if s.device.kind == "cuda" and s.timer.method == "cuda-events" else "")
        notes.append(f"kernels = sum of the step's partition kernels, each timed alone{cold}; overhead = wall - kernels; "
                     f"{EXCLUDED} (their time is in the overhead); PyTorch peers: wall and GPU time only")
    else:
        notes.append("step anatomy off (--no-anatomy): no kernel sum or overhead")
    return notes
