"""The MetaSchedule driver: tune a list of static-shape tasks into a JSON database.

Independent of the model: a :class:`~tuning.tasks.TuneTask` is one PrimFunc ``main`` with static
shapes and a weight (its call count). :func:`tune_tasks` then

1. locks the work directory (:mod:`tuning.lock`: a second writer is refused) and opens it as a
   writer through :class:`tuning.database.TunedDatabase` (corrupt lines quarantined, another
   arch refused);
2. measures the *untuned* schedule of every task that has none stored yet (:mod:`tuning.baseline`)
   with the same builder (:mod:`tuning.builder`) and runner (:mod:`tuning.runner`), and commits
   it as a tuning record, so the best stored record is never slower than what users get;
3. counts the search trials already stored per task and runs MetaSchedule's search for the
   remaining budget only (:mod:`tuning.search`), so re-running with the same ``work_dir``
   resumes a killed run;
4. reports progress once per measured batch (:mod:`tuning.progress`).

:func:`tuning.verify.verify_record` checks a record numerically against the untuned function;
``prune_best(..., verify=...)`` uses it before committing. One module per pluggable part, as in
TVM's own ``meta_schedule``; this one only composes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.space_generator import SpaceGenerator
from tvm.s_tir.meta_schedule.utils import cpu_count
from tvm.target import Target

from .baseline import measure_baselines
from .builder import PersistentLocalBuilder
from .database import TunedDatabase
from .dbfiles import UNTUNED_FILE, read_json, write_meta
from .intrinsics import preload_tensor_intrinsics
from .lock import DirLock
from .progress import TuneProgress, fmt_secs
from .runner import make_local_runner
from .search import SearchConfig, run_search
from .tasks import TuneTask, check_tasks, stored_trials_all

__all__ = ["TuneProgress", "TuneTask", "tune_tasks"]

logger = logging.getLogger(__name__)


def tune_tasks(
    tasks: Sequence[TuneTask],
    *,
    target: Target,
    work_dir: str | os.PathLike,
    max_trials_global: int,
    max_trials_per_task: int,
    num_trials_per_iter: int = 64,
    builder=None,
    runner=None,
    space: str | SpaceGenerator | Callable[[TuneTask], Any] = "post-order-apply",
    seed: int | None = None,
    cost_model: str | ms.cost_model.CostModel = "xgb",
    progress: Callable[[TuneProgress], None] | None = None,
    strategy_options: dict | None = None,
    measure_untuned: bool = True,
    untuned_rules: Sequence | None = None,
    num_tuning_cores: int | str = "physical",
    module_equality: str = "structural",
    meta: dict | None = None,
    quiet: bool = True,
    wait: bool = False,
    log: Callable[[str], None] | None = None,
    search_seconds: float | None = None,
) -> ms.database.JSONDatabase:
    """Tune tasks with MetaSchedule into the JSON database in ``work_dir`` (resumable).

    Parameters
    ----------
    tasks : sequence of TuneTask
        Static-shape tasks with unique names.
    target : tvm.target.Target
        The target (see :func:`tuning.targets.make_target`).
    work_dir : path
        Database directory (``database_*.json``, ``meta.json``, ``untuned.json``, ``logs/``).
        Re-running with the same directory resumes: stored trials count against the budgets.
    max_trials_global : int
        Total search trials over all tasks, stored ones included.
    max_trials_per_task : int
        Search trials per task, stored ones included.
    num_trials_per_iter : int
        Candidates measured per batch.
    builder : MetaSchedule Builder, optional
        Default: :class:`tuning.builder.PersistentLocalBuilder` (shut down on return).
    runner : MetaSchedule Runner, optional
        Default: :func:`tuning.runner.make_local_runner`; for another machine :func:`tuning.rpc.make_rpc_runner`.
    space : str, SpaceGenerator or callable
        The design space: a MetaSchedule space name, a ``SpaceGenerator`` (cloned per task), or
        ``space(task)`` returning either (or ``None`` to skip searching that task).
    seed : int, optional
        Seed of the search and the task scheduler.
    cost_model : str or CostModel
        ``"xgb"`` (default), ``"random"``, ``"mlp"`` or a CostModel.
    progress : callable, optional
        Called with a :class:`TuneProgress` after every measured batch (also logged).
    strategy_options : dict, optional
        Keyword arguments of MetaSchedule's ``EvolutionarySearch`` (e.g. ``population_size``).
    measure_untuned : bool
        Measure and store the untuned schedule of each task first (default; see module doc).
    untuned_rules : sequence of dlight rules, optional
        Rules of the untuned build; default :func:`tuning.untuned.dlight_rules`.
    num_tuning_cores : int or "physical" / "logical"
        CPU threads for search and cost model.
    module_equality : str
        MetaSchedule workload equality.
    meta : dict, optional
        Extra ``meta.json`` fields (model, quantization, buckets, trials, ...). The driver itself
        records the budgets, the task names and, at the end, ``trials_used`` (search trials
        stored over all tasks).
    quiet : bool
        Keep MetaSchedule's per-batch tables out of the console (they still go to ``logs/``).
    wait : bool
        When another process holds the work directory's lock: wait for it (default: raise
        :class:`tuning.lock.LockedError` naming the holder).
    log : callable, optional
        Receives one line as each phase starts (untuned baselines n/N, search).
    search_seconds : float, optional
        Wall-clock limit of the search phase: no new batch starts after it, the measured records
        stay (and the caller's verification and commit still run); a rerun resumes. None: no limit.

    Returns
    -------
    tvm.s_tir.meta_schedule.database.JSONDatabase
        The database (stored and new records).
    """
    check_tasks(tasks)
    if max_trials_global < 0 or max_trials_per_task < 0 or num_trials_per_iter <= 0:
        raise ValueError("trial budgets must be >= 0 and num_trials_per_iter > 0")
    if not isinstance(target, Target):
        raise TypeError("target must be a tvm.target.Target (see tuning.targets.make_target)")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    preload_tensor_intrinsics()
    with DirLock(work_dir, what="tuning work directory", wait=wait):
        database = TunedDatabase.open(work_dir, target=target, writer=True,
                                      module_equality=module_equality).ms
        write_meta(work_dir, target=target,
                   max_trials_global=max_trials_global, max_trials_per_task=max_trials_per_task,
                   num_trials_per_iter=num_trials_per_iter, tasks=[t.name for t in tasks],
                   **(meta or {}))
        search = SearchConfig(
            max_trials_global=max_trials_global, max_trials_per_task=max_trials_per_task,
            num_trials_per_iter=num_trials_per_iter, space=space, seed=seed, cost_model=cost_model,
            strategy_options=strategy_options or {}, num_tuning_cores=num_tuning_cores,
            module_equality=module_equality, quiet=quiet, progress=progress, search_seconds=search_seconds)
        _run(tasks, target=target, work_dir=work_dir, database=database, builder=builder,
             runner=runner, search=search, measure_untuned=measure_untuned,
             untuned_rules=untuned_rules, log=log)
    return database


def _run(tasks, *, target, work_dir: Path, database, builder, runner, search: SearchConfig,
         measure_untuned: bool, untuned_rules, log) -> None:
    own_builder = builder is None
    if own_builder:
        builder = PersistentLocalBuilder(
            max_workers=_cores(search.num_tuning_cores), timeout_sec=60.0)
    if runner is None:
        runner = make_local_runner()
    try:
        if measure_untuned:
            measure_baselines(tasks, target=target, database=database, builder=builder,
                              runner=runner, rules=untuned_rules, work_dir=work_dir, log=log)
        if log is not None:
            log("search: MetaSchedule evolutionary search (progress after every measured batch)")
        expired = run_search(tasks, target=target, work_dir=work_dir, database=database, builder=builder,
                             runner=runner, config=search)
        if expired and log is not None:
            log(f"search: time limit of {fmt_secs(search.search_seconds)} reached: no new batch started; "
                "what was measured is kept (a rerun resumes with the remaining trials)")
    finally:
        if own_builder:
            builder.shutdown()
    counts = stored_trials_all(database, [t.mod for t in tasks])
    write_meta(work_dir, trials_used=sum(n for n, _, _ in counts))
    _warn_if_slower_than_untuned(tasks, counts, work_dir)


def _warn_if_slower_than_untuned(tasks, counts, work_dir: Path) -> None:
    """The stored best can still lose to the untuned *symbolic* kernel when that one's schedule
    does not replay on the static function (then it could not be stored as a record)."""
    file = work_dir / UNTUNED_FILE
    table = read_json(file, {})
    for task, (_, _, best) in zip(tasks, counts):
        untuned = (table.get(task.name) or {}).get("untuned_us")
        if untuned and best * 1e6 > untuned:
            logger.warning(
                "task %s: best stored record %.2f us is slower than the untuned dynamic-shape "
                "kernel %.2f us; keep the untuned kernel at this shape", task.name, best * 1e6,
                untuned)


def _cores(num: int | str) -> int:
    if isinstance(num, int):
        return max(1, num)
    return max(1, cpu_count(logical=(num == "logical")))
