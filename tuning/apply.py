"""Apply a tuned database at compile time, and say how much of the step it covers.

The module is exported with the database's bucket entry points, prepared by the shared pipeline
(so each static kernel has the structural hash it had while tuning), and MetaSchedule's
``MetaScheduleApplyDatabase`` swaps in the tuned schedules. Everything else, including every
symbolic-shape kernel, is left to dlight afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tvm import IRModule
from tvm.target import Target

from .database import TunedDatabase
from .dbfiles import record_latency_s
from .partition import Task, specialize
from .targets import is_gpu
from .untuned import apply_dlight

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Coverage:
    """Which tasks of each bucket a database schedules, and their share of the step."""

    tuned: int
    total: int
    per_bucket: dict[str, tuple[int, int, float]]  # "decode b8" -> (tuned, total, share)

    def lines(self) -> list[str]:
        out = [f"tuned kernels: {self.tuned} of {self.total} bucket kernels"]
        for key, (tuned, total, share) in self.per_bucket.items():
            out.append(f"  {key}: {tuned}/{total} kernels tuned, {100 * share:.1f}% of the estimated step time")
        return out


def estimated_cost(task: Task) -> float:
    """A per-step cost proxy: bytes moved for decode (memory bound), FLOPs for prefill."""
    return task.weight * (task.bytes if task.phase == "decode" else max(task.flops, task.bytes))


def coverage(task_list: list[Task], applied: set[str]) -> Coverage:
    """How many tasks got a tuned schedule, and their share of each bucket's estimated cost."""
    per: dict[str, list[float]] = {}
    for task in task_list:
        key = f"{task.phase} {'b' if task.phase == 'decode' else 's'}{task.bucket}"
        has = task.kernel in applied
        acc = per.setdefault(key, [0, 0, 0.0, 0.0])
        acc[0] += int(has)
        acc[1] += 1
        acc[2] += estimated_cost(task) if has else 0.0
        acc[3] += estimated_cost(task)
    return Coverage(
        tuned=sum(t.kernel in applied for t in task_list),
        total=len(task_list),
        per_bucket={k: (int(a), int(b), (c / d) if d else 0.0) for k, (a, b, c, d) in per.items()},
    )


def apply_database(prepared: IRModule, *, database, target: Target, task_list: list[Task],
                   untuned_us: dict[str, float] | None = None) -> tuple[IRModule, list[str]]:
    """Swap in the tuned schedule of each task that ``database`` holds.

    A record slower than what the untuned build runs at that shape (``untuned_us``: the
    symbolic kernel's dlight schedule, measured while tuning) is not applied: the untuned
    schedule stays, so a tuned build is never slower kernel by kernel. Returns the module and
    the names of the kernels it tuned.
    """
    untuned_us = untuned_us or {}
    mod = prepared
    applied = []
    for task in task_list:
        record = database.query_tuning_record(task.mod(), target, "main")
        if record is None:
            continue
        best_us = record_latency_s(record) * 1e6
        if task.name in untuned_us and best_us > untuned_us[task.name]:
            logger.info("%s: stored best %.2f us is slower than untuned %.2f us: keeping untuned",
                        task.name, best_us, untuned_us[task.name])
            continue
        sch = database.query_schedule(task.mod(), target, "main")
        if sch is None:
            continue
        func = sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
        mod = _replace(mod, task.kernel, func)
        applied.append(task.kernel)
    return mod, applied


def _replace(mod: IRModule, name: str, func) -> IRModule:
    """A copy of ``mod`` with function ``name`` replaced (the caller's module stays as it was)."""
    mod = mod.clone()
    mod[mod.get_global_var(name)] = func
    return mod


def schedule_like_untuned(prepared: IRModule, *, target: Target, task_list: list[Task]) -> IRModule:
    """Give each still-unscheduled bucket kernel the schedule the dynamic build runs at its shape.

    dlight picks its rule from the function it sees: on a static batch of 8 it picks the SIMT
    ``Matmul``, on the symbolic batch ``LowBatchGEMV``. The untuned build must run what users get
    today, so a bucket kernel gets dlight's schedule of its symbolic twin, specialized to the
    bucket (the same code the dynamic function runs at that shape, with the shape folded in).
    Kernels without a twin keep dlight on their static form (applied later).
    """
    if not is_gpu(target):
        return prepared
    mod = prepared
    scheduled_twins: dict[str, object] = {}
    for task in task_list:
        if task.twin_name is None or tvm_is_scheduled(mod[task.kernel]):
            continue
        if task.twin_name not in scheduled_twins:
            sched = apply_dlight(IRModule({"main": prepared[task.twin_name]}), target=target)["main"]
            scheduled_twins[task.twin_name] = sched if tvm_is_scheduled(sched) else None
        sched = scheduled_twins[task.twin_name]
        if sched is None:
            continue
        func = specialize(sched, task.bucket).with_attr("tirx.is_scheduled", True)
        mod = _replace(mod, task.kernel, func)
    return mod


def find_database(*, database: str | Path | None, database_dir: str | Path, target: Target,
                  model: str, quantization: str) -> Path | None:
    """The database directory to compile with (``TunedDatabase.find``'s lookup): ``database`` if
    given (must exist), else ``database_dir/ARCH/MODEL-QUANT`` when it exists, else None."""
    db, msg = TunedDatabase.find(root=database_dir, target=target, model=model, quantization=quantization,
                                 explicit=database)
    if db is None:  # the user asked for a tuned build by default: say where we looked
        logger.warning("%s", msg)
        return None
    logger.info("%s", msg)
    return db.path


def tvm_is_scheduled(func) -> bool:
    """True for a PrimFunc marked scheduled (``tirx.is_scheduled``)."""
    return bool(func.attrs and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1)
