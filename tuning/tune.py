"""The MetaSchedule driver: tune a list of static-shape tasks into a JSON database.

Independent of the model: a :class:`TuneTask` is one PrimFunc ``main`` with static shapes and a
weight (its call count). :func:`tune_tasks` then

1. opens (or creates) the database in ``work_dir`` through :func:`tuning.database.open_database`
   (corrupt lines quarantined, another arch refused);
2. measures the *untuned* schedule of every task that has none stored yet (dlight
   ``ApplyDefaultSchedule`` rules for GPU targets, the unscheduled function for ``llvm``) with the
   same builder and runner, and commits it as a tuning record, so the best stored record is never
   slower than what users get without tuning;
3. counts the search trials already stored per task and runs MetaSchedule (evolutionary search,
   XGBoost cost model, gradient task scheduler) for the remaining budget only, so re-running with
   the same ``work_dir`` resumes a killed run;
4. reports progress once per measured batch (tasks done, trials used / budget, best latency per
   task, ETA).

:func:`verify_record` checks a record numerically against the untuned function;
``prune_best(..., verify=...)`` uses it before committing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.ir import IRModule
from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RunnerInput
from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy
from tvm.s_tir.meta_schedule.space_generator import SpaceGenerator
from tvm.target import Target

from .database import (
    _atomic_write_text,
    is_failed_run,
    open_database,
    record_latency_s,
    write_meta,
)
from .targets import arch_of

__all__ = [
    "PersistentLocalBuilder",
    "TuneProgress",
    "TuneTask",
    "default_dlight_rules",
    "is_search_record",
    "make_local_runner",
    "make_verifier",
    "preload_tensor_intrinsics",
    "stored_trials",
    "tune_tasks",
    "untuned_schedule",
    "verify_record",
]

logger = logging.getLogger(__name__)

UNTUNED_FILE = "untuned.json"


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


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


def _main_func(mod: IRModule | tvm.tirx.PrimFunc, what: str) -> tvm.tirx.PrimFunc:
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


def _buffer_params(func: tvm.tirx.PrimFunc) -> list[tuple[str, list, str] | None]:
    """(name, shape, dtype) of each parameter, ``None`` for a scalar parameter."""
    from tvm.tirx.buffer import BufferType

    out = []
    for param in func.params:
        if isinstance(getattr(param, "ty", None), BufferType):
            out.append((str(param.name), list(param.shape), str(param.dtype)))
        else:
            out.append(None)
    return out


def _symbolic_dims(func: tvm.tirx.PrimFunc) -> list[str]:
    out = []
    for i, entry in enumerate(_buffer_params(func)):
        if entry is None:
            out.append(f"scalar parameter #{i}")
            continue
        name, shape, _ = entry
        out.extend(f"{name}:{d}" for d in shape if not isinstance(d, tvm.tirx.IntImm))
    return out


def _normalize(mod: IRModule | tvm.tirx.PrimFunc) -> IRModule:
    """IRModule {"main": func} with global_symbol "main" (MetaSchedule's workload form)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(_main_func(mod, "task"))


def _check_tasks(tasks: Sequence[TuneTask]) -> None:
    import tvm_ffi

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
        sym = _symbolic_dims(_main_func(task.mod, f"task {task.name!r}"))
        if sym:
            raise ValueError(
                f"task {task.name!r} has symbolic dims ({', '.join(sym)}); MetaSchedule can only "
                "measure static shapes: bind them to a bucket first"
            )
        # Two tasks of one workload would share (and double-count) their records.
        mod = _normalize(task.mod)
        for other, other_mod in by_hash.setdefault(tvm_ffi.structural_hash(mod), []):
            if tvm_ffi.structural_equal(mod, other_mod):
                raise ValueError(f"tasks {other!r} and {task.name!r} are the same workload; "
                                 "merge them into one task (add their weights)")
        by_hash[tvm_ffi.structural_hash(mod)].append((task.name, mod))


# --------------------------------------------------------------------------------------------
# Import speed: TVMScript-parsed tensor intrinsics
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _memoized_getmodule():
    """Memoize ``inspect.getmodule`` misses while TVMScript parses many functions.

    The TVMScript parser calls ``inspect.stack()`` per function; for every frame of a file that
    is no module (``<frozen importlib._bootstrap>`` ...) ``inspect.getmodule`` rescans all of
    ``sys.modules``. Importing ``tvm.s_tir.tensor_intrin`` (≈250 functions, done by MetaSchedule's
    ``TuneContext`` and by its builder) then costs ~30 s of CPU instead of ~2 s. A miss is only
    re-checked when ``sys.modules`` changed size, so results are unchanged.
    """
    orig = inspect.getmodule
    misses: dict[str, int] = {}

    def getmodule(obj, _filename=None):
        if _filename is None or hasattr(obj, "__module__") or hasattr(obj, "__name__"):
            return orig(obj, _filename)
        if misses.get(_filename) == len(sys.modules):
            return None
        found = orig(obj, _filename)
        if found is None:
            misses[_filename] = len(sys.modules)
        return found

    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = orig


def preload_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (tensor-core intrinsics) quickly; idempotent."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with _memoized_getmodule():
        import tvm.s_tir.tensor_intrin  # noqa: F401


# --------------------------------------------------------------------------------------------
# Builder and runner
# --------------------------------------------------------------------------------------------


def _builder_worker_init() -> None:
    # MetaSchedule's default_build imports the tensor intrinsics inside the timed build call;
    # do it once per worker, fast, outside the timeout.
    preload_tensor_intrinsics()


@derived_object
class PersistentLocalBuilder(PyBuilder):
    """MetaSchedule's ``LocalBuilder`` with a worker pool kept across batches.

    ``LocalBuilder`` starts fresh worker processes for every batch (each importing TVM and the
    tensor intrinsics, seconds per batch); this one keeps them, recycling each worker after
    ``max_uses`` builds (the reason upstream restarts them is a slow leak). It builds with
    MetaSchedule's default build/export functions, so artifacts are identical.

    Parameters
    ----------
    max_workers : int, optional
        Parallel build processes (default: usable CPU cores).
    timeout_sec : float
        Limit for one build.
    max_uses : int
        Builds per worker process before it is restarted.
    """

    def __init__(self, *, max_workers: int | None = None, timeout_sec: float = 60.0,
                 max_uses: int = 256):
        super().__init__()
        from tvm.support.popen_pool import PopenPoolExecutor

        if max_workers is None:
            max_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.max_workers = int(max_workers)
        self.timeout_sec = float(timeout_sec)
        self._pool = PopenPoolExecutor(
            max_workers=self.max_workers,
            timeout=self.timeout_sec,
            initializer=_builder_worker_init,
            maximum_process_uses=max_uses,
        )

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
        from tvm.support.popen_pool import StatusKind

        results = []
        jobs = [(None, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
        for res in self._pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(
                    None, f"PersistentLocalBuilder: timeout, killed after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(
                    None, f"PersistentLocalBuilder: an exception occurred\n{res.value}"))
        return results

    def shutdown(self) -> None:
        """Stop the worker processes."""
        self._pool.shutdown()


def make_local_runner(
    *,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 100,
    enable_cpu_cache_flush: bool = False,
    timeout_sec: float = 30.0,
):
    """MetaSchedule ``LocalRunner`` measuring on this machine's device of the target kind.

    Parameters
    ----------
    number, repeat, min_repeat_ms, enable_cpu_cache_flush
        MetaSchedule ``EvaluatorConfig`` (see :func:`tuning.rpc.make_rpc_runner`).
    timeout_sec : float
        Limit for one measurement.
    """
    return ms.runner.LocalRunner(
        timeout_sec=timeout_sec,
        evaluator_config=EvaluatorConfig(
            number=number,
            repeat=repeat,
            min_repeat_ms=min_repeat_ms,
            enable_cpu_cache_flush=enable_cpu_cache_flush,
        ),
    )


# --------------------------------------------------------------------------------------------
# Untuned baseline
# --------------------------------------------------------------------------------------------


def default_dlight_rules(target: Target) -> list:
    """The dlight rules of the untuned GPU build (``tuning.compile.dlight_rules``); ``[]`` for CPU."""
    if arch_of(target) == "cpu":
        return []
    from .compile import dlight_rules

    return dlight_rules(target)


def untuned_schedule(
    mod: IRModule | tvm.tirx.PrimFunc, *, target: Target, rules: Sequence | None = None
) -> Schedule | None:
    """The schedule the untuned build gives a function, as a traced ``Schedule``.

    For GPU targets the first dlight rule that applies (``ApplyDefaultSchedule`` semantics);
    for ``llvm`` the unscheduled function (empty trace). ``None`` if no rule applies.
    """
    mod = _normalize(mod)
    func = mod["main"]
    rules = default_dlight_rules(target) if rules is None else list(rules)
    if not rules:
        return Schedule(mod)
    with target:
        for rule in rules:
            sch = rule.apply(func, target, False)
            if sch is None:
                continue
            if isinstance(sch, (list, tuple)):
                sch = sch[0]
            return sch
    return None


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
    return _stored_trials_all(database, [mod])[0]


def _stored_trials_all(database, mods) -> list[tuple[int, int, float]]:
    """:func:`stored_trials` of many workloads in one pass over the records."""
    keys = []
    for mod in mods:
        mod = _normalize(mod)
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


def _device_type(target: Target) -> str:
    """Runner device type of a target: ``cpu`` for llvm, ``cuda`` for cuda, ..."""
    return str(tvm.runtime.device_from_target(target)).split(":")[0]


def _measure(builder, runner, target: Target, mods: list[IRModule], args_info) -> list:
    """Build and run modules; per module the runner's run_secs (FloatImm list) or an error str."""
    build_results = builder.build([BuilderInput(m, target) for m in mods])
    out: list[Any] = [None] * len(mods)
    inputs, where = [], []
    for i, br in enumerate(build_results):
        if br.error_msg is not None:
            out[i] = f"build: {str(br.error_msg).strip().splitlines()[-1][:300]}"
        else:
            inputs.append(RunnerInput(br.artifact_path, _device_type(target), args_info))
            where.append(i)
    if inputs:
        for i, fut in zip(where, runner.run(inputs)):
            res = fut.result()
            if res.error_msg is not None:
                out[i] = f"run: {str(res.error_msg).strip().splitlines()[-1][:300]}"
            else:
                out[i] = list(res.run_secs)
    for br in build_results:  # what MetaSchedule's RemoveBuildArtifact does
        if br.artifact_path is not None:
            shutil.rmtree(os.path.dirname(str(br.artifact_path)), ignore_errors=True)
    return out


def _mean_s(run_secs) -> float:
    secs = [float(s) for s in run_secs]
    return float("inf") if is_failed_run(secs) else sum(secs) / len(secs)


def _measure_untuned(task: TuneTask, *, target, database, builder, runner, rules) -> dict:
    """Measure and commit the untuned candidates of one task; returns the untuned.json entry."""
    mod = _normalize(task.mod)
    rules = default_dlight_rules(target) if rules is None else list(rules)
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
                    if not _structurally_equal(replay.mod, sch.mod):
                        cands.append(("symbolic-replayed", replay))
                except Exception as err:  # other rule, other loops: not replayable here
                    logger.debug("task %s: symbolic dlight trace does not replay: %s",
                                 task.name, err)
    results = _measure(builder, runner, target, [s.mod for _, s in cands] + [m for _, m in extra],
                       args_info)
    entry: dict[str, Any] = {"candidates_us": {}}
    workload = database.commit_workload(mod)
    for (label, s), res in zip(cands, results[: len(cands)]):
        if isinstance(res, str):
            logger.warning("task %s: untuned %s schedule failed (%s)", task.name, label, res)
            entry["candidates_us"][label] = None
            continue
        entry["candidates_us"][label] = _mean_s(res) * 1e6
        database.commit_tuning_record(ms.database.TuningRecord(
            s.trace, workload, res, target, args_info))
    for (label, _), res in zip(extra, results[len(cands):]):
        entry["candidates_us"][label] = None if isinstance(res, str) else _mean_s(res) * 1e6
    # What users get today at this shape: the symbolic kernel when given, else the static one.
    ref = entry["candidates_us"].get("symbolic") or entry["candidates_us"].get("static")
    entry["untuned_us"] = ref
    committed = [v for k, v in entry["candidates_us"].items() if k != "symbolic" and v]
    entry["baseline_record_us"] = min(committed) if committed else None
    if not committed:
        logger.warning("task %s: no untuned schedule could be measured and stored", task.name)
    return entry


def _structurally_equal(a, b) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.structural_equal(a, b))


# --------------------------------------------------------------------------------------------
# Budget and progress
# --------------------------------------------------------------------------------------------


class _SharedBudget:
    def __init__(self, remaining: int):
        self.remaining = remaining


@derived_object
class _BudgetedSearch(PySearchStrategy):
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
        if allowed <= 0:
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
        return _BudgetedSearch(self.inner.clone(), self.budget, self.shared)


@dataclass
class TuneProgress:
    """One progress report (after each measured batch)."""

    round: int
    task: str
    tasks_done: int
    n_tasks: int
    trials_used: int
    trials_budget: int
    session_trials: int
    best_us: dict[str, float | None]
    elapsed_s: float
    eta_s: float | None

    def format(self) -> str:
        """One log line."""
        eta = "?" if self.eta_s is None else _fmt_secs(self.eta_s)
        best = ", ".join(
            f"{k}={'n/a' if v is None else f'{v:.2f}us'}" for k, v in self.best_us.items()
        )
        return (
            f"[round {self.round}] {self.task}: tasks done {self.tasks_done}/{self.n_tasks}, "
            f"trials {self.trials_used}/{self.trials_budget}, elapsed "
            f"{_fmt_secs(self.elapsed_s)}, ETA {eta} | best: {best}"
        )


def _fmt_secs(secs: float) -> str:
    secs = int(round(secs))
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@derived_object
class _ProgressCallback(PyMeasureCallback):
    """Measure callback that reports :class:`TuneProgress` after every batch."""

    def __init__(self, state: dict, progress: Callable[[TuneProgress], None] | None):
        self.state = state
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        st = self.state
        name = st["ids"][int(task_id)]
        st["round"] += 1
        st["used"][name] += len(runner_results)
        for br, rr in zip(builder_results, runner_results):
            if br.error_msg is None and rr.error_msg is None and rr.run_secs is not None:
                st["best"][name] = min(st["best"][name], _mean_s(rr.run_secs))
        session = sum(st["used"].values())
        stored = sum(st["stored"].values())
        left_global = st["global_left0"] - session
        left_tasks = sum(max(0, st["cap"][n] - st["used"][n]) for n in st["cap"])
        left = max(0, min(left_global, left_tasks))
        elapsed = time.monotonic() - st["t0"]
        done = sum(1 for n in st["all"] if st["cap"].get(n, 0) - st["used"].get(n, 0) <= 0)
        info = TuneProgress(
            round=st["round"],
            task=name,
            tasks_done=done if left > 0 else len(st["all"]),
            n_tasks=len(st["all"]),
            trials_used=stored + session,
            trials_budget=st["budget"],
            session_trials=session,
            best_us={n: (None if b == float("inf") else b * 1e6) for n, b in st["best"].items()},
            elapsed_s=elapsed,
            eta_s=(elapsed / session * left) if session else None,
        )
        logger.info("%s", info.format())
        if self.progress is not None:
            try:
                self.progress(info)
            except Exception:  # a broken progress hook must not kill a long tuning run
                logger.exception("progress callback failed")


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


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
        Default: :class:`PersistentLocalBuilder` (shut down on return).
    runner : MetaSchedule Runner, optional
        Default: :func:`make_local_runner`; for another machine :func:`tuning.rpc.make_rpc_runner`.
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
        Rules of the untuned build; default :func:`default_dlight_rules`.
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

    Returns
    -------
    tvm.s_tir.meta_schedule.database.JSONDatabase
        The database (stored and new records).
    """
    _check_tasks(tasks)
    if max_trials_global < 0 or max_trials_per_task < 0 or num_trials_per_iter <= 0:
        raise ValueError("trial budgets must be >= 0 and num_trials_per_iter > 0")
    if not isinstance(target, Target):
        raise TypeError("target must be a tvm.target.Target (see tuning.targets.make_target)")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    preload_tensor_intrinsics()
    database = open_database(work_dir, target=target, create=True,
                             module_equality=module_equality)
    write_meta(work_dir, target=target,
               max_trials_global=max_trials_global, max_trials_per_task=max_trials_per_task,
               num_trials_per_iter=num_trials_per_iter, tasks=[t.name for t in tasks],
               **(meta or {}))

    own_builder = builder is None
    if own_builder:
        builder = PersistentLocalBuilder(
            max_workers=_cores(num_tuning_cores), timeout_sec=60.0)
    if runner is None:
        runner = make_local_runner()
    try:
        if measure_untuned:
            _baselines(tasks, target=target, database=database, builder=builder, runner=runner,
                       rules=untuned_rules, work_dir=work_dir)
        _search(tasks, target=target, work_dir=work_dir, database=database, builder=builder,
                runner=runner, max_trials_global=max_trials_global,
                max_trials_per_task=max_trials_per_task,
                num_trials_per_iter=num_trials_per_iter, space=space, seed=seed,
                cost_model=cost_model, progress=progress,
                strategy_options=strategy_options or {}, num_tuning_cores=num_tuning_cores,
                module_equality=module_equality, quiet=quiet)
    finally:
        if own_builder:
            builder.shutdown()
    counts = _stored_trials_all(database, [t.mod for t in tasks])
    write_meta(work_dir, trials_used=sum(n for n, _, _ in counts))
    _warn_if_slower_than_untuned(tasks, counts, work_dir)
    return database


def _warn_if_slower_than_untuned(tasks, counts, work_dir: Path) -> None:
    """The stored best can still lose to the untuned *symbolic* kernel when that one's schedule
    does not replay on the static function (then it could not be stored as a record)."""
    file = work_dir / UNTUNED_FILE
    table = json.loads(file.read_text()) if file.exists() else {}
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
    from tvm.s_tir.meta_schedule.utils import cpu_count

    return max(1, cpu_count(logical=(num == "logical")))


def _baselines(tasks, *, target, database, builder, runner, rules, work_dir: Path) -> None:
    file = work_dir / UNTUNED_FILE
    try:
        table = json.loads(file.read_text()) if file.exists() else {}
    except json.JSONDecodeError:
        table = {}
    counts = _stored_trials_all(database, [t.mod for t in tasks])
    for task, (_, base, _) in zip(tasks, counts):
        if base > 0 and task.name in table:
            continue
        t0 = time.monotonic()
        table[task.name] = _measure_untuned(task, target=target, database=database,
                                            builder=builder, runner=runner, rules=rules)
        _atomic_write_text(file, json.dumps(table, indent=2, sort_keys=True))
        logger.info("task %s: untuned %s us (measured in %.1f s)", task.name,
                    _fmt_opt(table[task.name].get("untuned_us")), time.monotonic() - t0)


def _fmt_opt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


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


def _search(tasks, *, target, work_dir, database, builder, runner, max_trials_global,
            max_trials_per_task, num_trials_per_iter, space, seed, cost_model, progress,
            strategy_options, num_tuning_cores, module_equality, quiet) -> None:
    from tvm.s_tir.meta_schedule.utils import fork_seed

    stored = {}
    best = {}
    for task, (n_search, _, b) in zip(tasks, _stored_trials_all(database, [t.mod for t in tasks])):
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
        return

    loggers, restore = _setup_logs(work_dir, [t.name for t, _ in todo], quiet=quiet)
    try:
        shared = _SharedBudget(global_left)
        ctxs = []
        for (task, task_space), task_logger, rand in zip(todo, loggers,
                                                         fork_seed(seed, n=len(todo))):
            inner = ms.search_strategy.EvolutionarySearch(**strategy_options)
            ctxs.append(ms.TuneContext(
                mod=_normalize(task.mod),
                target=target,
                space_generator=task_space,
                search_strategy=_BudgetedSearch(inner, caps[task.name], shared),
                task_name=task.name,
                rand_state=rand,
                num_threads=num_tuning_cores,
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
                     _ProgressCallback(state, progress)]
        ms.tune_tasks(
            tasks=ctxs,
            task_weights=[float(t.weight) for t, _ in todo],
            work_dir=str(work_dir),
            max_trials_global=global_left,
            max_trials_per_task=max(caps[t.name] for t, _ in todo),
            num_trials_per_iter=num_trials_per_iter,
            builder=builder,
            runner=runner,
            database=database,
            cost_model=cost_model,
            measure_callbacks=callbacks,
            task_scheduler=ms.task_scheduler.GradientBased(
                seed=-1 if seed is None else int(seed)),
            module_equality=module_equality,
        )
    finally:
        restore()


# --------------------------------------------------------------------------------------------
# Numerical check
# --------------------------------------------------------------------------------------------


def _random_args(func: tvm.tirx.PrimFunc, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for i, entry in enumerate(_buffer_params(func)):
        if entry is None:
            raise ValueError(f"verify: parameter #{i} is a scalar; cannot fill it")
        name, shape, dtype = entry
        shape = [int(d) for d in shape]
        if dtype.startswith("float") or dtype.startswith("bfloat"):
            arr = rng.uniform(-1.0, 1.0, size=shape).astype("float32")
            arr = arr.astype(dtype) if dtype != "bfloat16" else arr
        elif dtype.startswith("int") or dtype.startswith("uint"):
            arr = rng.integers(0, 4, size=shape).astype(dtype)  # small: safe as indices
        elif dtype == "bool":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise ValueError(f"verify: unsupported dtype {dtype} of {name}")
        out.append(arr)
    return out


def _run_on(lib, device, args: list[np.ndarray]) -> list[np.ndarray]:
    tensors = [tvm.runtime.tensor(a, device=device) for a in args]
    lib["main"](*tensors)
    device.sync()
    return [t.numpy() for t in tensors]


def verify_record(
    record: ms.database.TuningRecord,
    *,
    target: Target,
    device_or_rpc: Any = None,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    seed: int = 0,
) -> bool:
    """Check a tuning record numerically against the untuned function.

    Builds the record's schedule and the untuned schedule of the same workload (dlight for GPU,
    unscheduled for ``llvm``), runs both on the same random inputs, and compares every buffer
    afterwards (outputs must match within ``rtol``/``atol``; inputs must be left intact).

    Parameters
    ----------
    record : TuningRecord
        The record to check.
    target : tvm.target.Target
        The build target.
    device_or_rpc : optional
        ``None`` (this machine's device of the target kind), a ``tvm.runtime.Device``, an
        ``tvm.rpc.RPCSession``, or ``(host, port, key)`` of a tracker to request a session from.
    rtol, atol : float
        Tolerances (``np.allclose`` semantics, NaNs equal).
    seed : int
        Seed of the random inputs.

    Returns
    -------
    bool
        True when all buffers match; False (logged with the worst error) otherwise.
    """
    mod = record.workload.mod
    sch = Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    ref_sch = untuned_schedule(mod, target=target)
    if ref_sch is None:
        raise ValueError("verify: no untuned schedule applies to this workload")
    func = mod["main"]
    args = _random_args(func, np.random.default_rng(seed))
    cand_lib = tvm.compile(sch.mod, target=target)
    ref_lib = tvm.compile(ref_sch.mod, target=target)

    session = device_or_rpc
    if isinstance(session, tuple):
        from tvm.s_tir.meta_schedule.runner import RPCConfig

        host, port, key = session
        session = RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                            session_timeout_sec=120).connect_server()
    if session is None:
        device = tvm.runtime.device_from_target(target)
    elif isinstance(session, tvm.runtime.Device):
        device = session
    else:  # an RPC session: ship both libraries
        device = session.device(_device_type(target), 0)
        with tempfile.TemporaryDirectory() as tmp:
            from tvm.support.tar import tar

            libs = []
            for name, lib in (("cand", cand_lib), ("ref", ref_lib)):
                path = os.path.join(tmp, f"{name}.{tar.output_format}")
                lib.export_library(path, fcompile=tar)
                session.upload(path)
                libs.append(session.load_module(os.path.basename(path)))
            cand_lib, ref_lib = libs
    got = _run_on(cand_lib, device, args)
    want = _run_on(ref_lib, device, args)
    ok = True
    for entry, g, w in zip(_buffer_params(func), got, want):
        if g.dtype == bool or np.issubdtype(g.dtype, np.integer):
            same = np.array_equal(g, w)
            worst = float(np.abs(g.astype(np.int64) - w.astype(np.int64)).max(initial=0))
        else:
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            # max-abs error over max-abs reference: a reduction over K = 3072 in fp16 differs by
            # accumulation order alone far beyond an element-wise rtol, never beyond this scale.
            diff = np.abs(g64 - w64)
            worst = float(np.nanmax(diff)) if diff.size else 0.0
            scale = float(np.nanmax(np.abs(w64))) if w64.size else 0.0
            new_nan = bool(np.any(np.isnan(g64) & ~np.isnan(w64)))
            same = not new_nan and worst <= atol + rtol * scale
        if not same:
            ok = False
            logger.warning("verify: buffer %s differs from the untuned result (max |diff| %.3g, "
                           "rtol %g of max |ref|, atol %g)", entry[0], worst, rtol, atol)
    return ok


def make_verifier(*, target: Target, device_or_rpc: Any = None, rtol: float = 1e-3,
                  atol: float = 1e-3) -> Callable[[ms.database.TuningRecord], bool]:
    """``verify_record`` with fixed settings, as ``prune_best(..., verify=...)`` wants it."""
    return functools.partial(verify_record, target=target, device_or_rpc=device_or_rpc,
                             rtol=rtol, atol=atol)
