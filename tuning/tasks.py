"""Tuning tasks: one static-shape PrimFunc ``main`` with a weight, and what is stored for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm.ir import IRModule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod
from tvm.tirx.buffer import BufferType

from .dbfiles import record_latency_s

__all__ = ["TuneTask", "check_tasks", "is_search_record", "normalize", "stored_trials", "stored_trials_all"]


@dataclass
class TuneTask:
    """One kernel to tune.

    Attributes
    ----------
    name : str
        Unique task name (used in logs and progress lines).
    mod : IRModule
        One PrimFunc ``main`` with static shapes (symbolic dims already bound to a bucket).
    weight : float
        Relative importance, e.g. calls per forward pass; the gradient scheduler spends trials
        where ``weight × latency`` can drop the most.
    untuned_mod : IRModule, optional
        The function the untuned (dynamic-shape) build really runs at this shape, e.g. the same
        kernel with a symbolic batch. dlight may pick another rule for it. Its kernel is measured
        at the task's shape (``untuned_us`` in ``untuned.json``: what users get today), and its
        schedule, where the trace replays on ``mod``, is stored as one more untuned record.
    """

    name: str
    mod: IRModule
    weight: float = 1.0
    untuned_mod: IRModule | None = None


def main_func(mod: IRModule | tvm.tirx.PrimFunc, what: str) -> tvm.tirx.PrimFunc:
    if isinstance(mod, tvm.tirx.PrimFunc):
        return mod
    if not isinstance(mod, IRModule):
        raise TypeError(f"{what}: expected an IRModule or PrimFunc, got {type(mod).__name__}")
    funcs = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    if "main" in funcs:
        return mod["main"]
    if len(funcs) == 1:
        return mod[funcs[0]]
    raise ValueError(f"{what}: expected one PrimFunc 'main', found {funcs or 'none'}")


def buffer_params(func: tvm.tirx.PrimFunc) -> list[tuple[str, list, str] | None]:
    """(name, shape, dtype) of each parameter, ``None`` for a scalar parameter."""
    out = []
    for param in func.params:
        if isinstance(getattr(param, "ty", None), BufferType):
            out.append((str(param.name), list(param.shape), str(param.dtype)))
        else:
            out.append(None)
    return out


def _symbolic_dims(func: tvm.tirx.PrimFunc) -> list[str]:
    out = []
    for i, entry in enumerate(buffer_params(func)):
        if entry is None:
            out.append(f"scalar parameter #{i}")
            continue
        name, shape, _ = entry
        out.extend(f"{name}:{d}" for d in shape if not isinstance(d, tvm.tirx.IntImm))
    return out


def normalize(mod: IRModule | tvm.tirx.PrimFunc) -> IRModule:
    """IRModule {"main": func} with global_symbol "main" (MetaSchedule's workload form)."""
    return _normalize_mod(main_func(mod, "task"))


def check_tasks(tasks: Sequence[TuneTask]) -> None:
    if not tasks:
        raise ValueError("no tasks to tune")
    seen = set()
    by_hash: dict[int, list[tuple[str, IRModule]]] = {}
    for task in tasks:
        if not isinstance(task, TuneTask):
            raise TypeError(f"expected TuneTask, got {type(task).__name__}")
        if task.name in seen:
            raise ValueError(f"duplicate task name {task.name!r}")
        seen.add(task.name)
        if not task.weight > 0:
            raise ValueError(f"task {task.name!r}: weight must be > 0, got {task.weight}")
        sym = _symbolic_dims(main_func(task.mod, f"task {task.name!r}"))
        if sym:
            raise ValueError(
                f"task {task.name!r} has symbolic dims ({', '.join(sym)}); MetaSchedule can only "
                "measure static shapes: bind them to a bucket first"
            )
        # Two tasks of one workload would share (and double-count) their records.
        mod = normalize(task.mod)
        for other, other_mod in by_hash.setdefault(tvm_ffi.structural_hash(mod), []):
            if tvm_ffi.structural_equal(mod, other_mod):
                raise ValueError(f"tasks {other!r} and {task.name!r} are the same workload; "
                                 "merge them into one task (add their weights)")
        by_hash[tvm_ffi.structural_hash(mod)].append((task.name, mod))


def is_search_record(record: ms.database.TuningRecord) -> bool:
    """True for a record that MetaSchedule's search produced (its trace entered postprocessing).

    Untuned baseline records committed by :func:`tune_tasks` replay a dlight schedule or none,
    with no ``EnterPostproc`` instruction, so they do not count as search trials.
    """
    return any(inst.kind.name == "EnterPostproc" for inst in record.trace.insts)


def stored_trials(database: ms.database.Database, mod: IRModule) -> tuple[int, int, float]:
    """Records stored for a task's workload.

    Returns
    -------
    (search_trials, baseline_records, best_seconds)
        Search trials (failed ones included, as MetaSchedule counts them), untuned baseline
        records, and the best valid mean latency in seconds (``inf`` if none).
    """
    return stored_trials_all(database, [mod])[0]


def stored_trials_all(database, mods) -> list[tuple[int, int, float]]:
    """:func:`stored_trials` of many workloads in one pass over the records."""
    keys = []
    for mod in mods:
        mod = normalize(mod)
        # commit_workload returns the stored Workload object, so records hash to the same handle
        keys.append(hash(database.commit_workload(mod)) if database.has_workload(mod) else None)
    wanted = {k for k in keys if k is not None}
    stats: dict[int, list] = {}
    if wanted:
        for rec in database.get_all_tuning_records():
            key = hash(rec.workload)
            if key not in wanted:
                continue
            st = stats.setdefault(key, [0, 0, float("inf")])
            st[0 if is_search_record(rec) else 1] += 1
            st[2] = min(st[2], record_latency_s(rec))
    return [tuple(stats.get(k, (0, 0, float("inf")))) for k in keys]
