"""The databases committed under databases/: layout, meta.json, one record per workload, replay + build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuning.targets import KNOWN_ARCHS, make_target
from tuning.validate import validate_database

ROOT = Path(__file__).resolve().parents[2] / "databases"
# Committed databases are GPU ones (databases/sm_XX/MODEL-QUANT); CPU databases live under the
# git-ignored databases/local/ and are never committed (tuning.database).
DATABASES = sorted(p.parent for p in ROOT.glob("sm_*/*/meta.json"))


def test_there_are_committed_databases():
    assert any(p.parent.name == "sm_90" for p in DATABASES)


@pytest.mark.parametrize("path", DATABASES, ids=[f"{p.parent.name}/{p.name}" for p in DATABASES])
def test_committed_database(path):
    arch = path.parent.name
    assert arch in KNOWN_ARCHS
    meta = json.loads((path / "meta.json").read_text())
    model, quant = path.name.rsplit("-", 1)
    assert (meta["model"], meta["quantization"], meta["arch"]) == (model, quant, arch)
    assert meta["pruned"] is True and meta["tvm_version"] and meta["tvm_ffi_version"]
    assert meta["device"]["gpu_name"] and meta["device"]["driver_version"]  # the card it was tuned on
    assert meta["buckets"] and meta["tasks"]
    lines = (path / "database_tuning_record.json").read_text().splitlines()
    workloads = [json.loads(line)[0] for line in lines]
    assert len(workloads) == len(set(workloads)), "committed form keeps one record per workload"
    assert (path / "untuned.json").is_file()
    report = validate_database(path, target=make_target(arch))
    assert report.ok(), report.failures
    assert report.records == len(lines)


@pytest.mark.slow  # exports and prepares preset gpt2 (about a minute per database on 2 cores)
@pytest.mark.parametrize("path", DATABASES, ids=[f"{p.parent.name}/{p.name}" for p in DATABASES])
def test_committed_records_are_found_by_compile(path):
    """Every workload of a committed database is a kernel of the module compile prepares today
    (same structural hash): a change to the model or the pipeline that would silently orphan the
    committed records fails here."""
    from tvm.s_tir import meta_schedule as ms

    from gpt2_model.config import get_config
    from tuning.database import TunedDatabase
    from tuning.partition import partition

    target = make_target(path.parent.name)
    db = TunedDatabase.open(path, target=target)
    model, quant = path.name.rsplit("-", 1)
    tasks = partition(get_config(model), quantization=quant, target=target, buckets=db.buckets)
    keys = {task.name for task in tasks if db.ms.has_workload(task.mod())}
    today = ms.database.MemoryDatabase(module_equality="structural")
    for task in tasks:
        today.commit_workload(task.mod())
    orphans = [w.mod["main"] for w in db.workloads if not today.has_workload(w.mod)]
    assert not orphans, "committed workloads no kernel of today's module has: " + "; ".join(
        ", ".join(f"{p.name}{list(int(d) for d in p.shape)}" for p in f.params if hasattr(p, "shape")) for f in orphans)
    assert len(keys) == len(db.workloads)
