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

import tvm
from tvm import IRModule, relax
from tvm.target import Target

from .partition import Task, tasks_of

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


def coverage(task_list: list[Task], database, target: Target) -> Coverage:
    """How many tasks the database has a record for, and their share of each bucket's cost."""
    per: dict[str, list[float]] = {}
    tuned_total = 0
    for task in task_list:
        key = f"{task.phase} {'b' if task.phase == 'decode' else 's'}{task.bucket}"
        has = database.query_tuning_record(task.mod(), target, "main") is not None
        tuned_total += int(has)
        acc = per.setdefault(key, [0, 0, 0.0, 0.0])
        acc[0] += int(has)
        acc[1] += 1
        acc[2] += estimated_cost(task) if has else 0.0
        acc[3] += estimated_cost(task)
    return Coverage(
        tuned=tuned_total,
        total=len(task_list),
        per_bucket={k: (int(a), int(b), (c / d) if d else 0.0) for k, (a, b, c, d) in per.items()},
    )


def apply_database(prepared: IRModule, *, database, target: Target) -> IRModule:
    """Swap in the tuned schedules of ``database`` (kernels it lacks stay unscheduled)."""
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)


def find_database(*, database: str | Path | None, database_dir: str | Path, target: Target,
                  model: str, quantization: str) -> Path | None:
    """The database to compile with: ``database`` if given (must exist), else the default
    ``database_dir/ARCH/MODEL-QUANT`` when it exists, else None (untuned)."""
    from .database import database_path  # pylint: disable=import-outside-toplevel
    from .targets import arch_of  # pylint: disable=import-outside-toplevel

    if database is not None:
        path = Path(database)
        if not path.is_dir():
            raise FileNotFoundError(f"tuned database {path} does not exist")
        return path
    path = database_path(database_dir, arch=arch_of(target), model=model, quantization=quantization)
    if path.is_dir():
        logger.info("using tuned database %s", path)
        return path
    logger.info("no tuned database at %s: untuned build", path)
    return None


def tvm_is_scheduled(func) -> bool:
    return bool(func.attrs and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1)


def scheduled_names(mod: IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and tvm_is_scheduled(f)}
