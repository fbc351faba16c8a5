"""Progress of a tuning run: phase lines, one line per measured batch with a measured-rate ETA.

The rate is measured from the end of the first round on (the first measured batch of every
searched task): those batches also pay for design-space generation, the builds of a whole
population and cost-model start-up, and counting them made the ETA of a run tens of minutes when
it ended in under one. MetaSchedule reports a round's batches together when it joins them (on an
H200, 2026-12-02: five tasks' first batches 0.2 s apart after 2m38s of work), so a rate measured
from the first batch alone read 10,000 trials/min; until the first round is over the rate is the
session's average.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

from .runner import mean_s

__all__ = ["ProgressCallback", "TuneProgress", "fmt_secs"]

logger = logging.getLogger(__name__)


def fmt_secs(secs: float) -> str:
    """``1h02m03s`` / ``2m03s``."""
    secs = int(round(secs))
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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
    rate_per_min: float | None = None

    def format(self) -> str:
        """One line: trials done / budget, measured rate, elapsed, ETA, the batch's task."""
        eta = "?" if self.eta_s is None else fmt_secs(self.eta_s)
        rate = "" if self.rate_per_min is None else f", {self.rate_per_min:.1f} trials/min"
        best = self.best_us.get(self.task)
        pct = 100.0 * self.trials_used / self.trials_budget if self.trials_budget else 100.0
        return (
            f"[round {self.round}] trials {self.trials_used}/{self.trials_budget} ({pct:.0f}%){rate}, "
            f"tasks done {self.tasks_done}/{self.n_tasks}, elapsed {fmt_secs(self.elapsed_s)}, ETA {eta}"
            f" | {self.task}: best {'n/a' if best is None else f'{best:.2f}us'}"
        )


@derived_object
class ProgressCallback(PyMeasureCallback):
    """Measure callback that reports :class:`TuneProgress` after every batch.

    ``state`` keys: ``ids`` (task names of the searched tasks, by task id), ``all`` (all task
    names), ``used``/``cap``/``stored``/``best`` (per task), ``budget``, ``global_left0``, ``t0``.
    """

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
                st["best"][name] = min(st["best"][name], mean_s(rr.run_secs))
        session = sum(st["used"].values())
        stored = sum(st["stored"].values())
        left_global = st["global_left0"] - session
        left_tasks = sum(max(0, st["cap"][n] - st["used"][n]) for n in st["cap"])
        left = max(0, min(left_global, left_tasks))
        now = time.monotonic()
        elapsed = now - st["t0"]
        if "first" not in st and st["round"] >= len(st["ids"]):  # the first round is over (module doc)
            st["first"] = (now, session)
        t1, n1 = st.get("first", (None, None))
        if t1 is not None and session > n1 and now > t1:
            rate = (session - n1) / (now - t1)
        else:
            rate = session / elapsed if elapsed > 0 else None
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
            eta_s=(left / rate) if rate else None,
            rate_per_min=rate * 60 if rate else None,
        )
        logger.info("%s", info.format())
        if self.progress is not None:
            try:
                self.progress(info)
            except Exception:  # a broken progress hook must not kill a long tuning run
                logger.exception("progress callback failed")
