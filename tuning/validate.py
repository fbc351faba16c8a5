"""Offline check of a committed database: every record replays on its workload and builds.

The numerical check of each committed record ran when it was committed (``prune_best`` with
``tuning.tune.verify_record`` on the card that measured it: tuned kernel vs untuned kernel on
random inputs). This is the part that needs no GPU, so it can run anywhere (CI, a laptop, before
a compile): parse (with quarantine), replay each trace with its decisions on a fresh schedule of
its workload, and build it for the database's target.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tvm
from tvm.s_tir import Schedule
from tvm.target import Target


@dataclasses.dataclass
class ValidationReport:
    records: int
    replayed: int
    built: int
    failures: list[str]

    def ok(self) -> bool:
        return not self.failures and self.records == self.built

    def line(self) -> str:
        return (f"{self.records} records: {self.replayed} replayed, {self.built} built"
                + (f", {len(self.failures)} failed" if self.failures else ""))


def validate_database(path: str | Path, *, target: Target, build: bool = True) -> ValidationReport:
    """Replay and build every record of the database at ``path`` for ``target``."""
    from .database import open_database  # pylint: disable=import-outside-toplevel

    db = open_database(Path(path), target=target)
    records = db.get_all_tuning_records()
    replayed = built = 0
    failures = []
    for i, record in enumerate(records):
        mod = record.workload.mod
        try:
            sch = Schedule(mod)
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            replayed += 1
            if build:
                tvm.compile(sch.mod, target=target)
                built += 1
        except Exception as err:  # pylint: disable=broad-except
            failures.append(f"record {i}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return ValidationReport(records=len(records), replayed=replayed, built=built if build else replayed,
                            failures=failures)
