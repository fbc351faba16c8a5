"""The search strategy of the tuning driver: MetaSchedule's evolutionary search under budgets.

MetaSchedule's ``tune_tasks`` runs the search (XGBoost cost model, gradient task scheduler);
this module adds what resuming needs: each task's own remaining cap and one shared global budget
(:class:`BudgetedSearch`), per-task log files, and the progress callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy
from tvm.s_tir.meta_schedule.space_generator import SpaceGenerator
from tvm.s_tir.meta_schedule.utils import fork_seed

from .progress import ProgressCallback, TuneProgress
from .tasks import normalize, stored_trials_all

__all__ = ["BudgetedSearch", "SearchConfig", "run_search"]

logger = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    """Settings of one search (see :func:`tuning.tune.tune_tasks` for their meaning)."""

    max_trials_global: int
    max_trials_per_task: int
    num_trials_per_iter: int = 64
    space: Any = "post-order-apply"
    seed: int | None = None
    cost_model: Any = "xgb"
    strategy_options: dict = field(default_factory=dict)
    num_tuning_cores: int | str = "physical"
    module_equality: str = "structural"
    quiet: bool = True
    progress: Callable[[TuneProgress], None] | None = None
    #: Wall seconds after which no new batch is generated (None: no limit); what was measured is kept.
    search_seconds: float | None = None


class _SharedBudget:
    def __init__(self, remaining: int, *, deadline: float | None = None):
        self.remaining = remaining
        self.deadline = deadline  # time.monotonic() after which no new batch starts
        self.expired = False

    def time_left(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.expired = True
        return not self.expired


@derived_object
class BudgetedSearch(PySearchStrategy):
    """A search strategy capped at this task's remaining trials and the shared global budget.

    MetaSchedule gives every task the same ``max_trials_per_task``; after a resume the tasks have
    different remainders, and its global count may overshoot by a partial batch. This wrapper
    passes the task's own cap to the inner strategy and trims batches to the global remainder.
    """

    def __init__(self, inner, budget: int, shared: _SharedBudget):
        self.inner = inner
        self.budget = int(budget)
        self.shared = shared
        self.used = 0

    def _initialize_with_tune_context(self, context) -> None:
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None,
                   cost_model=None) -> None:
        self.inner.pre_tuning(min(int(max_trials), self.budget), num_trials_per_iter,
                              design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        allowed = min(self.budget - self.used, self.shared.remaining)
        if allowed <= 0 or not self.shared.time_left():
            return None
        cands = self.inner.generate_measure_candidates()
        if cands is None:
            return None
        cands = list(cands)[:allowed]
        if not cands:
            return None
        self.used += len(cands)
        self.shared.remaining -= len(cands)
        return cands

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return BudgetedSearch(self.inner.clone(), self.budget, self.shared)


_MS_LOGGER = "tvm.s_tir.meta_schedule"


def _setup_logs(work_dir: Path, names: list[str], *, quiet: bool):
    """Per-task log files and the scheduler log under ``work_dir/logs`` (MetaSchedule's names).

    MetaSchedule's own ``get_loggers_from_work_dir`` reconfigures logging globally through
    ``dictConfig`` and fails when called again in a process whose logger has unnamed handlers;
    this attaches plain file handlers for the run and returns a function that removes them.
    """
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    added: list[tuple[logging.Logger, logging.Handler]] = []

    def attach(lg: logging.Logger, file: Path) -> None:
        handler = logging.FileHandler(file, mode="a")
        handler.setFormatter(fmt)
        handler.setLevel(logging.DEBUG)
        lg.addHandler(handler)
        added.append((lg, handler))

    ms_logger = logging.getLogger(_MS_LOGGER)
    saved = (ms_logger.level, ms_logger.propagate)
    ms_logger.setLevel(logging.DEBUG)
    if quiet:  # its per-batch tables stay in the log file
        ms_logger.propagate = False
    attach(ms_logger, log_dir / f"{_MS_LOGGER}.logging.task_scheduler.log")
    width = len(str(len(names) - 1))
    loggers = []
    for i, name in enumerate(names):
        lg = logging.getLogger(f"{_MS_LOGGER}.logging.task_{i:0{width}d}_{name[:100]}")
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        for h in [h for h in lg.handlers if getattr(h, "_tuning_run", False)]:
            lg.removeHandler(h)
        attach(lg, log_dir / f"{lg.name}.log")
        loggers.append(lg)
    for _, h in added:
        h._tuning_run = True

    def restore() -> None:
        for lg, h in added:
            lg.removeHandler(h)
            h.close()
        ms_logger.setLevel(saved[0])
        ms_logger.propagate = saved[1]

    return loggers, restore


def run_search(tasks, *, target, work_dir: Path, database, builder, runner, config: SearchConfig) -> bool:
    """Search every task with budget left (stored search trials count against the budgets).

    Returns True when ``config.search_seconds`` ran out before the budget (no batch was started
    after it; the measured ones are in the database), False otherwise."""
    c = config
    max_trials_global, max_trials_per_task, space = c.max_trials_global, c.max_trials_per_task, c.space
    stored = {}
    best = {}
    for task, (n_search, _, b) in zip(tasks, stored_trials_all(database, [t.mod for t in tasks])):
        stored[task.name], best[task.name] = n_search, b
    global_left = max(0, max_trials_global - sum(stored.values()))
    caps = {t.name: max(0, max_trials_per_task - stored[t.name]) for t in tasks}
    todo = []
    for task in tasks:
        task_space = space(task) if callable(space) and not isinstance(space, SpaceGenerator) \
            else space
        if task_space is None or caps[task.name] == 0:
            continue
        if isinstance(task_space, SpaceGenerator):
            task_space = task_space.clone()
        todo.append((task, task_space))
    logger.info(
        "search: %d of %d task(s) with budget left; %d trial(s) stored, %d left globally",
        len(todo), len(tasks), sum(stored.values()), global_left,
    )
    if not todo or global_left == 0:
        return False

    loggers, restore = _setup_logs(work_dir, [t.name for t, _ in todo], quiet=c.quiet)
    try:
        shared = _SharedBudget(global_left, deadline=(None if c.search_seconds is None
                                                      else time.monotonic() + float(c.search_seconds)))
        ctxs = []
        for (task, task_space), task_logger, rand in zip(todo, loggers,
                                                         fork_seed(c.seed, n=len(todo))):
            inner = ms.search_strategy.EvolutionarySearch(**c.strategy_options)
            ctxs.append(ms.TuneContext(
                mod=normalize(task.mod),
                target=target,
                space_generator=task_space,
                search_strategy=BudgetedSearch(inner, caps[task.name], shared),
                task_name=task.name,
                rand_state=rand,
                num_threads=c.num_tuning_cores,
                logger=task_logger,
            ))
        state = {
            "ids": [t.name for t, _ in todo],
            "all": [t.name for t in tasks],
            "round": 0,
            "used": {t.name: 0 for t in tasks},
            "cap": caps,
            "stored": stored,
            "best": best,
            "budget": min(max_trials_global, max_trials_per_task * len(tasks)),
            "global_left0": global_left,
            "t0": time.monotonic(),
        }
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                     ProgressCallback(state, c.progress)]
        ms.tune_tasks(
            tasks=ctxs,
            task_weights=[float(t.weight) for t, _ in todo],
            work_dir=str(work_dir),
            max_trials_global=global_left,
            max_trials_per_task=max(caps[t.name] for t, _ in todo),
            num_trials_per_iter=c.num_trials_per_iter,
            builder=builder,
            runner=runner,
            database=database,
            cost_model=c.cost_model,
            measure_callbacks=callbacks,
            task_scheduler=ms.task_scheduler.GradientBased(
                seed=-1 if c.seed is None else int(c.seed)),
            module_equality=c.module_equality,
        )
        return shared.expired
    finally:
        restore()
