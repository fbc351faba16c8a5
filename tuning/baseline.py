"""The untuned baseline of every task, measured with the tuning run's builder and runner.

For each task the untuned schedule (:mod:`tuning.untuned`) of the static function, and of its
symbolic twin (what the dynamic-shape build runs at this shape) where given, are measured; the
replayable ones are committed as tuning records (so the stored best is never slower than the
untuned build, by construction and by measurement), and the times go to ``untuned.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm_ffi
from tvm.ir import IRModule
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from .dbfiles import UNTUNED_FILE, atomic_write_text, read_json
from .runner import mean_s, measure
from .tasks import TuneTask, normalize, stored_trials_all
from .untuned import dlight_rules, untuned_schedule

__all__ = ["measure_baselines"]

logger = logging.getLogger(__name__)


def _measure_untuned(task: TuneTask, *, target, database, builder, runner, rules) -> dict:
    """Measure and commit the untuned candidates of one task; returns the untuned.json entry."""
    mod = normalize(task.mod)
    rules = dlight_rules(target) if rules is None else list(rules)
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    cands: list[tuple[str, Schedule]] = []

    def schedule_of(label, m):
        try:
            return untuned_schedule(m, target=target, rules=rules)
        except Exception as err:  # the untuned build of this function would fail the same way
            logger.warning("task %s: no untuned %s schedule: %s: %s", task.name, label,
                           type(err).__name__, str(err).strip().splitlines()[-1][:200])
            return None

    sch = schedule_of("static", mod)
    if sch is not None:
        cands.append(("static", sch))
    extra: list[tuple[str, IRModule]] = []
    if task.untuned_mod is not None:
        sym_sch = schedule_of("symbolic", task.untuned_mod)
        if sym_sch is not None:
            extra.append(("symbolic", sym_sch.mod))
            if sch is not None and rules:  # try the symbolic schedule on the static func
                try:
                    replay = Schedule(mod)
                    sym_sch.trace.apply_to_schedule(replay, remove_postproc=False)
                    if not tvm_ffi.structural_equal(replay.mod, sch.mod):
                        cands.append(("symbolic-replayed", replay))
                except Exception as err:  # other rule, other loops: not replayable here
                    logger.debug("task %s: symbolic dlight trace does not replay: %s",
                                 task.name, err)
    results = measure(builder, runner, target, [s.mod for _, s in cands] + [m for _, m in extra],
                       args_info)
    entry: dict[str, Any] = {"candidates_us": {}}
    workload = database.commit_workload(mod)
    for (label, s), res in zip(cands, results[: len(cands)]):
        if isinstance(res, str):
            logger.warning("task %s: untuned %s schedule failed (%s)", task.name, label, res)
            entry["candidates_us"][label] = None
            continue
        entry["candidates_us"][label] = mean_s(res) * 1e6
        database.commit_tuning_record(ms.database.TuningRecord(
            s.trace, workload, res, target, args_info))
    for (label, _), res in zip(extra, results[len(cands):]):
        entry["candidates_us"][label] = None if isinstance(res, str) else mean_s(res) * 1e6
    # What users get today at this shape: the symbolic kernel when given, else the static one.
    ref = entry["candidates_us"].get("symbolic") or entry["candidates_us"].get("static")
    entry["untuned_us"] = ref
    committed = [v for k, v in entry["candidates_us"].items() if k != "symbolic" and v]
    entry["baseline_record_us"] = min(committed) if committed else None
    if not committed:
        logger.warning("task %s: no untuned schedule could be measured and stored", task.name)
    return entry


def measure_baselines(tasks, *, target, database, builder, runner, rules, work_dir: Path,
                      log: Callable[[str], None] | None = None) -> None:
    """Measure the untuned candidates of every task that has none stored yet (resumable).

    Parameters
    ----------
    tasks : list of TuneTask
    target : tvm.target.Target
    database : MetaSchedule database
        Where the replayable untuned schedules are committed as records.
    builder, runner
        The run's MetaSchedule builder and runner.
    rules : sequence of dlight rules or None
        Default :func:`tuning.untuned.dlight_rules`.
    work_dir : path
        Its ``untuned.json`` is updated after every task.
    log : callable, optional
        Receives one line per task as it starts ("untuned baseline 3/7: ...").
    """
    file = work_dir / UNTUNED_FILE
    try:
        table = read_json(file, {})
    except ValueError:
        table = {}
    counts = stored_trials_all(database, [t.mod for t in tasks])
    todo = [t for t, (_, base, _) in zip(tasks, counts) if not (base > 0 and t.name in table)]
    for i, task in enumerate(todo, 1):
        if log is not None:
            log(f"untuned baseline {i}/{len(todo)}: {task.name}")
        t0 = time.monotonic()
        table[task.name] = _measure_untuned(task, target=target, database=database,
                                            builder=builder, runner=runner, rules=rules)
        atomic_write_text(file, json.dumps(table, indent=2, sort_keys=True))
        logger.info("task %s: untuned %s us (measured in %.1f s)", task.name,
                    _fmt_opt(table[task.name].get("untuned_us")), time.monotonic() - t0)


def _fmt_opt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
