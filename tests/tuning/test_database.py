"""tuning.database: layout, meta.json, quarantine of bad lines, arch check, pruned committed form.

The databases here are written through MetaSchedule's own JSONDatabase with hand-made schedules
and made-up timings, so no tuning is needed.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import tvm
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from tuning.database import (
    META_FILE,
    UNTUNED_FILE,
    DatabaseIntegrityWarning,
    TunedDatabase,
    RECORD_FILE,
    WORKLOAD_FILE,
    DatabaseMismatchError,
    DatabaseVersionWarning,
    database_path,
    open_database,
    prune_best,
    read_meta,
    record_latency_s,
    write_meta,
)
from tuning.targets import make_target

from .conftest import matmul_bias


def _record(db, mod, target, factor: int, secs: float):
    """Commit a record whose schedule splits the row loop by ``factor``; returns the record."""
    sch = Schedule(mod)
    i, _, _ = sch.get_loops(sch.get_sblock("C"))
    sch.split(i, factors=[None, factor])
    workload = db.commit_workload(mod)
    rec = ms.database.TuningRecord(
        sch.trace, workload, [tvm.tirx.FloatImm("float32", secs)], target,
        ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    db.commit_tuning_record(rec)
    return rec


def _split_factor(record) -> int:
    sch = Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    loops = sch.get_loops(sch.get_sblock("C"))
    return int(sch.get(loops[1]).extent)


def make_db(path, target, *, meta=True):
    """Two workloads: mm64 with timings 30/10/20 us (+1 failure), mm32 with 5 us."""
    path.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(path))
    mm64, mm32 = matmul_bias(), matmul_bias(32, 32, 32)
    _record(db, mm64, target, 2, 30e-6)
    _record(db, mm64, target, 4, 10e-6)
    _record(db, mm64, target, 8, 20e-6)
    _record(db, mm64, target, 16, 1e10)  # how MetaSchedule stores a failed candidate
    _record(db, mm32, target, 4, 5e-6)
    if meta:
        write_meta(path, target=target, model="toy")
    return mm64, mm32


def _lines(path, name):
    return (path / name).read_text().splitlines()


def test_database_path_layout(tmp_path):
    assert database_path(tmp_path, arch="sm_90", model="gpt2", quantization="q0f16") == \
        tmp_path / "sm_90" / "gpt2-q0f16"
    # CPU databases: one stable arch name, under the git-ignored local/ (never mistaken for committed ones)
    assert database_path(tmp_path, arch="cpu", model="gpt2", quantization="q0f32") == \
        tmp_path / "local" / "cpu" / "gpt2-q0f32"
    with pytest.raises(ValueError):
        database_path(tmp_path, arch="sm_90", model="", quantization="q0f16")


def test_meta_written_atomically_and_merged(tmp_path, cpu_target):
    import tvm_ffi

    meta = write_meta(tmp_path, target=cpu_target, model="toy", buckets=[1, 2])
    assert read_meta(tmp_path) == meta
    assert meta["tvm_version"] == tvm.__version__
    assert meta["tvm_ffi_version"] == tvm_ffi.__version__
    assert meta["arch"] == "cpu" and meta["target"]["kind"] == "llvm"
    assert meta["device"]["cpu"]["mcpu"] == str(cpu_target.attrs["mcpu"])
    assert str(tvm.target.Target(meta["target"])) == str(cpu_target)
    write_meta(tmp_path, trials=5)  # update keeps earlier fields
    meta2 = read_meta(tmp_path)
    assert meta2["model"] == "toy" and meta2["buckets"] == [1, 2] and meta2["trials"] == 5
    assert sorted(os.listdir(tmp_path)) == [META_FILE]  # no temp file left behind
    assert read_meta(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="target"):
        write_meta(tmp_path / "new")


def test_open_finds_records(tmp_path, cpu_target):
    mm64, mm32 = make_db(tmp_path, cpu_target)
    db = open_database(tmp_path, target=cpu_target)
    assert len(db) == 5
    best = db.query_tuning_record(mm64, cpu_target, "main")
    assert _split_factor(best) == 4 and record_latency_s(best) == pytest.approx(10e-6)
    assert _split_factor(db.query_tuning_record(mm32, cpu_target, "main")) == 4


def test_corrupt_and_truncated_lines_are_quarantined_by_the_writer(tmp_path, cpu_target, caplog):
    mm64, _ = make_db(tmp_path, cpu_target)
    rfile = tmp_path / RECORD_FILE
    lines = _lines(tmp_path, RECORD_FILE)
    good_best = lines[1]
    lines[2] = "{this is not json"
    text = "\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2]  # kill -9 mid-write
    rfile.write_text(text)
    with pytest.raises(Exception):  # what MetaSchedule itself does with such a file
        ms.database.JSONDatabase(work_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, "tuning.dbfiles"), \
            pytest.warns(DatabaseIntegrityWarning, match="2 bad line.*quarantined"):
        db = open_database(tmp_path, target=cpu_target, create=True)  # the writer (tune's work dir)
    assert len(db) == 4  # 5 records, one overwritten by garbage; the truncated 6th dropped
    quarantine = (tmp_path / (RECORD_FILE + ".quarantine")).read_text().splitlines()
    assert quarantine == ["{this is not json", lines[0][: len(lines[0]) // 2]]
    assert good_best in _lines(tmp_path, RECORD_FILE)
    assert rfile.read_text().endswith("\n")
    assert sum("quarantined" in r.message for r in caplog.records) == 2
    assert _split_factor(db.query_tuning_record(mm64, cpu_target, "main")) == 4
    # the cleaned database opens quietly and MetaSchedule can append to it again
    _record(db, mm64, cpu_target, 32, 1e-6)
    db2 = open_database(tmp_path, target=cpu_target)
    assert len(db2) == 5
    assert _split_factor(db2.query_tuning_record(mm64, cpu_target, "main")) == 32


def test_corrupt_workload_takes_its_records_and_reindexes(tmp_path, cpu_target):
    mm64, mm32 = make_db(tmp_path, cpu_target)
    wl = _lines(tmp_path, WORKLOAD_FILE)
    assert len(wl) == 2
    (tmp_path / WORKLOAD_FILE).write_text('["123", "bm90IGEgbW9kdWxl"]\n' + wl[1] + "\n")
    with pytest.warns(DatabaseIntegrityWarning, match="quarantined"):
        db = open_database(tmp_path, target=cpu_target, create=True)
    assert len(db) == 1
    assert not db.has_workload(mm64)
    rec = db.query_tuning_record(mm32, cpu_target, "main")
    assert rec is not None and record_latency_s(rec) == pytest.approx(5e-6)
    assert json.loads(_lines(tmp_path, RECORD_FILE)[0])[0] == 0  # re-indexed
    assert len((tmp_path / (RECORD_FILE + ".quarantine")).read_text().splitlines()) == 4


def test_database_for_another_arch_is_refused(tmp_path, cpu_target):
    make_db(tmp_path, cpu_target)
    with pytest.raises(DatabaseMismatchError, match="arch: the database is for cpu, the build target is sm_90"):
        open_database(tmp_path, target=make_target("sm_90"))
    # records alone betray the arch when meta.json is missing
    (tmp_path / META_FILE).unlink()
    with pytest.raises(DatabaseMismatchError, match="tuning record target"):
        open_database(tmp_path, target=make_target("sm_86"))
    # a CPU database for another CPU model
    write_meta(tmp_path, target=cpu_target)
    meta = read_meta(tmp_path)
    meta["target"]["mcpu"] = "cortex-a72"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatabaseMismatchError, match="cortex-a72"):
        open_database(tmp_path, target=cpu_target)


def test_tvm_version_mismatch_warns_only(tmp_path, cpu_target):
    make_db(tmp_path, cpu_target)
    write_meta(tmp_path, tvm_version="0.1.0")
    with pytest.warns(DatabaseVersionWarning, match="0.1.0"):
        db = open_database(tmp_path, target=cpu_target)
    assert len(db) == 5


def test_missing_database(tmp_path, cpu_target):
    with pytest.raises(FileNotFoundError, match="no tuning database"):
        open_database(tmp_path / "none", target=cpu_target)
    db = open_database(tmp_path / "new", target=cpu_target, create=True)
    assert len(db) == 0 and (tmp_path / "new" / WORKLOAD_FILE).exists()


def test_prune_keeps_best_per_workload(tmp_path, cpu_target):
    src, out = tmp_path / "full", tmp_path / "pruned"
    mm64, mm32 = make_db(src, cpu_target)
    before = (src / RECORD_FILE).read_text()
    summary = prune_best(src, out_path=out)
    assert summary == {0: pytest.approx(10e-6), 1: pytest.approx(5e-6)}
    assert (src / RECORD_FILE).read_text() == before  # the full database is untouched
    assert read_meta(out)["pruned"] is True and read_meta(out)["model"] == "toy"
    db = open_database(out, target=cpu_target)
    recs = db.get_all_tuning_records()
    assert len(recs) == 2
    assert not recs[0].workload.same_as(recs[1].workload)  # one record per workload
    assert _split_factor(db.query_tuning_record(mm64, cpu_target, "main")) == 4
    assert _split_factor(db.query_tuning_record(mm32, cpu_target, "main")) == 4
    # in place: same result, atomic replace of the record file only
    prune_best(src)
    assert len(_lines(src, RECORD_FILE)) == 2
    assert not [f for f in os.listdir(src) if f.endswith(".tmp")]


def test_prune_verify_rejection_falls_back(tmp_path, cpu_target, caplog):
    mm64, _ = make_db(tmp_path, cpu_target)
    seen = []

    def verify(record):
        seen.append(_split_factor(record))
        if _split_factor(record) == 4:  # the fastest mm64 record is "wrong"
            return False
        return True

    with caplog.at_level(logging.WARNING, "tuning.database"):
        summary = prune_best(tmp_path, out_path=tmp_path / "out", verify=verify)
    assert seen == [4, 8, 4]  # mm64: best rejected, next best accepted; mm32: accepted
    assert summary[0] == pytest.approx(20e-6)
    assert any("rejected" in r.message for r in caplog.records)
    db = open_database(tmp_path / "out", target=cpu_target)
    assert _split_factor(db.query_tuning_record(mm64, cpu_target, "main")) == 8


def test_prune_verify_errors_and_total_rejection(tmp_path, cpu_target):
    mm64, mm32 = make_db(tmp_path, cpu_target)

    def verify(record):
        if record.workload.mod["main"].params[0].shape[0] == 64:
            raise RuntimeError("cannot run")  # a crash counts as a rejection
        return True

    summary = prune_best(tmp_path, out_path=tmp_path / "out", verify=verify)
    assert summary[0] is None and summary[1] == pytest.approx(5e-6)
    db = open_database(tmp_path / "out", target=cpu_target)
    assert db.query_tuning_record(mm64, cpu_target, "main") is None  # never the failed one
    assert db.query_tuning_record(mm32, cpu_target, "main") is not None
