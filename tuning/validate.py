"""Offline check of a database: every line parses and every record replays on its workload and builds.

The numerical check of each committed record ran when it was committed (``prune_best`` with
``tuning.verify.verify_record`` on the card that measured it: tuned kernel vs untuned kernel on
random inputs). This is the part that needs no GPU, so it can run anywhere (CI, a laptop, before
a compile). It never writes: bad lines are reported, not moved (``tune --repair`` moves them).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import tvm
from tvm.s_tir import Schedule
from tvm.target import Target

from .builder import build_kernel
from .database import DatabaseIntegrityWarning, TunedDatabase

__all__ = ["ValidationReport", "validate_database"]


@dataclasses.dataclass
class ValidationReport:
    """What :func:`validate_database` found: counts and one line per failure."""

    records: int
    replayed: int
    built: int
    failures: list[str]

    def ok(self) -> bool:
        """True when every line parsed and every record replayed and built."""
        return not self.failures and self.records == self.built

    def line(self) -> str:
        """One summary line."""
        return (f"{self.records} records: {self.replayed} replayed, {self.built} built"
                + (f", {len(self.failures)} failed" if self.failures else ""))


def _reason(err: Exception) -> str:
    lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()]
    text = next((x for x in reversed(lines) if "Error" in x and "(not rendered)" not in x), lines[-1] if lines else "")
    return f"{type(err).__name__}: {text[:300]}"


def validate_database(path: str | Path, *, target: Target, build: bool = True) -> ValidationReport:
    """Check every line of the database at ``path`` for ``target``, without changing it.

    Parameters
    ----------
    path : path
        The database directory.
    target : tvm.target.Target
        The target to replay and build for (the database must be for its arch).
    build : bool
        Also build every replayed record (otherwise replay only).

    Returns
    -------
    ValidationReport
        Bad lines (that do not parse, or whose index points at the wrong workload) and records
        that fail to replay or build are failures, each with the reason.
    """
    with warnings.catch_warnings():  # the bad lines are reported below, one by one
        warnings.simplefilter("ignore", DatabaseIntegrityWarning)
        db = TunedDatabase.open(Path(path), target=target)
    failures = [str(b) for b in db.bad_lines]
    records = db.ms.get_all_tuning_records()
    replayed = built = 0
    for i, record in enumerate(records):
        try:
            sch = Schedule(record.workload.mod, error_render_level="detail")
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            replayed += 1
            if build:
                build_kernel(sch.mod, target)
                built += 1
        except Exception as err:  # pylint: disable=broad-except
            failures.append(f"record {i}: {_reason(err)}")
    total = len(records) + len(db.bad_lines)
    return ValidationReport(records=total, replayed=replayed, built=built if build else replayed,
                            failures=failures)
