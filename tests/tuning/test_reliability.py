"""Reliability of tuning databases (issue 14): concurrent runs, read-only opens, validation that
changes nothing, identity checks, bad arguments refused first, file modes.

Databases are written through MetaSchedule's own JSONDatabase (``make_db``); the lock test runs
two real ``tune`` processes on the tiny model.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tuning.database import (
    META_FILE,
    RECORD_FILE,
    WORKLOAD_FILE,
    DatabaseIntegrityWarning,
    DatabaseMismatchError,
    TunedDatabase,
    prune_best,
    read_meta,
    write_meta,
)
from tuning.dbfiles import atomic_write_text
from tuning.lock import DirLock, LockedError
from tuning.validate import validate_database

from .conftest import matmul_bias
from .test_database import make_db

REPO = Path(__file__).resolve().parents[2]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _break(path: Path) -> list[str]:
    """Three bad record lines: garbage, an index pointing at the other workload, a truncated line."""
    lines = (path / RECORD_FILE).read_text().splitlines()
    idx, rec = json.loads(lines[0])
    assert idx == 0  # mm64's record; workload 1 is mm32 (other argument shapes)
    lines[1] = "{not json"
    lines[2] = json.dumps([1, rec], separators=(",", ":"))
    (path / RECORD_FILE).write_text("\n".join(lines) + "\n" + lines[0][:40])
    return lines


# -- 1. workload indices and hashes are checked on load ----------------------------------------


def test_index_to_the_wrong_workload_and_a_changed_hash_are_caught(tmp_path, cpu_target):
    make_db(tmp_path, cpu_target)
    _break(tmp_path)
    with pytest.warns(DatabaseIntegrityWarning):
        db = TunedDatabase.open(tmp_path, target=cpu_target)
    reasons = {b.lineno: b.reason for b in db.bad_lines}
    assert set(reasons) == {2, 3, 6}
    assert "other arguments" in reasons[3] and "workload index 1" in reasons[3]
    assert "JSONDecodeError" in reasons[2] or "Expecting" in reasons[2]
    assert db.num_records == 3
    # a workload whose stored structural hash no longer matches its module
    wl = (tmp_path / WORKLOAD_FILE).read_text().splitlines()
    h, mod = json.loads(wl[1])
    wl[1] = json.dumps([str(int(h) + 1), mod])
    (tmp_path / WORKLOAD_FILE).write_text("\n".join(wl) + "\n")
    db = TunedDatabase.open(tmp_path, target=cpu_target)
    bad_w = [b for b in db.bad_lines if b.file.name == WORKLOAD_FILE]
    assert len(bad_w) == 1 and "hash" in bad_w[0].reason.lower()


# -- 2. validate reports every bad record, exits non-zero, changes nothing ----------------------


def test_validate_reports_every_bad_line_and_never_writes(tmp_path, cpu_target, capsys):
    from tuning.cli import main

    root = tmp_path / "databases"
    db_dir = root / "local" / "cpu" / "tiny-q0f32"
    make_db(db_dir, cpu_target)
    _break(db_dir)
    before = _snapshot(db_dir)
    report = validate_database(db_dir, target=cpu_target)
    assert not report.ok() and len(report.failures) == 3
    assert any("other arguments" in f for f in report.failures)
    assert main(["--arch", "cpu", "--model", "tiny", "--quantization", "q0f32", "--validate",
                 "--database-dir", str(root)]) == 1
    out = capsys.readouterr().out
    assert "3 failed" in out and "line 3: workload index 1 points at a workload with other arguments" in out
    assert "(not rendered)" not in out
    assert _snapshot(db_dir) == before  # nothing rewritten, no quarantine file


def test_quarantine_reason_says_why_a_trace_does_not_replay(tmp_path, cpu_target):
    """A record whose trace does not fit its workload: the reason is TVM's rendered error."""
    make_db(tmp_path, cpu_target)
    lines = (tmp_path / RECORD_FILE).read_text().splitlines()
    idx, rec = json.loads(lines[0])
    trace = json.dumps(rec[0]).replace('"C"', '"NO_SUCH_BLOCK"')
    lines[0] = json.dumps([idx, [json.loads(trace), *rec[1:]]], separators=(",", ":"))
    (tmp_path / RECORD_FILE).write_text("\n".join(lines) + "\n")
    with pytest.warns(DatabaseIntegrityWarning, match="trace does not replay"):
        db = TunedDatabase.open(tmp_path, target=cpu_target, writer=True)
    (bad,) = db.bad_lines
    assert "NO_SUCH_BLOCK" in bad.reason and "(not rendered)" not in bad.reason
    assert (tmp_path / (RECORD_FILE + ".quarantine")).read_text().strip() == lines[0]


# -- 3. opening never rewrites; a read-only database with a bad line opens ---------------------


def test_read_only_database_with_a_bad_line_opens_unchanged_with_one_warning(tmp_path, cpu_target):
    make_db(tmp_path, cpu_target)
    _break(tmp_path)
    before = _snapshot(tmp_path)
    modes = {p: p.stat().st_mode for p in [tmp_path, *tmp_path.iterdir()]}
    for p in tmp_path.iterdir():
        p.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = TunedDatabase.open(tmp_path, target=cpu_target)
            second = TunedDatabase.open(tmp_path, target=cpu_target)
        integrity = [w for w in caught if issubclass(w.category, DatabaseIntegrityWarning)]
        assert len(integrity) == 1 and "3 bad line(s) skipped" in str(integrity[0].message)
        for db in (first, second):
            assert db.num_records == 3 and len(db.ms) == 3
            assert db.ms.query_tuning_record(matmul_bias(), cpu_target, "main") is not None
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))
    assert _snapshot(tmp_path) == before


def test_repair_moves_bad_lines_explicitly(tmp_path, cpu_target):
    make_db(tmp_path, cpu_target)
    lines = _break(tmp_path)
    with pytest.warns(DatabaseIntegrityWarning):
        assert TunedDatabase.open(tmp_path, target=cpu_target).repair() == 3
    assert (tmp_path / (RECORD_FILE + ".quarantine")).read_text().splitlines()[0] == lines[1]
    assert TunedDatabase.open(tmp_path, target=cpu_target).bad_lines == []


# -- 4. every identity field of meta.json is checked ----------------------------------------


@pytest.mark.parametrize("field, value, kwargs, says", [
    ("arch", "sm_80", {}, "arch: the database is for sm_80, the build target is cpu"),
    ("target.mcpu", "cortex-a72", {}, "target: the database was tuned for CPU mcpu=cortex-a72"),
    ("config_hash", "0123456789abcdef", {"model_hash": "fedcba9876543210"}, "model hash:"),
    ("quantization", "q4f16_1", {"quantization": "q0f32"}, "quantization: the database is for q4f16_1, not q0f32"),
])
def test_each_identity_field_mismatch_is_refused_in_one_line(tmp_path, cpu_target, field, value, kwargs, says):
    make_db(tmp_path, cpu_target)
    write_meta(tmp_path, config_hash="fedcba9876543210", quantization="q0f32")
    TunedDatabase.open(tmp_path, target=cpu_target, model_hash="fedcba9876543210", quantization="q0f32")  # matches
    meta = read_meta(tmp_path)
    if field == "target.mcpu":
        meta["target"]["mcpu"] = value
    else:
        meta[field] = value
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DatabaseMismatchError) as info:
        TunedDatabase.open(tmp_path, target=cpu_target, **kwargs)
    msg = str(info.value)
    assert says in msg and "\n" not in msg


# -- 5. bad arguments are refused before any work; files honour the umask -----------------------


@pytest.mark.parametrize("argv, says", [
    (["--trials-per-task", "-5"], "--trials-per-task must be a positive integer"),
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--phases", "decode,train"], "--phases: unknown train"),
    (["--kinds", "gemv,conv"], "--kinds: unknown conv"),
    (["--workers", "0"], "--workers must be a positive integer"),
    (["--rpc-tracker", "127.0.0.1:9190"], "--rpc-tracker needs --rpc-key"),
])
def test_bad_arguments_are_refused_before_tvm_is_even_imported(argv, says):
    script = ("import sys; from tuning.cli import main; rc = main(sys.argv[1:]); "
              "print('RC', rc, 'tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script, "--arch", "cpu", "--model", "tiny", *argv],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "RC 1 False"  # no TVM: no model was exported
    assert says in out.stderr and out.stderr.count("\n") == 1


def test_database_files_honour_the_umask(tmp_path, cpu_target):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        make_db(tmp_path / "full", cpu_target)
        prune_best(tmp_path / "full", out_path=tmp_path / "pruned")
        os.umask(0o002)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o664
    for name in (WORKLOAD_FILE, RECORD_FILE, META_FILE):
        assert stat.S_IMODE((tmp_path / "pruned" / name).stat().st_mode) == 0o644


# -- 1. one writer at a time ------------------------------------------------------------------


_HOLD = """
import sys, time
from tuning.lock import DirLock
with DirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_lock_names_its_holder_and_wait_queues_behind_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path), "4"], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        t_held = time.monotonic()
        with pytest.raises(LockedError, match=f"in use by pid {proc.pid} on .*--wait"):
            with DirLock(tmp_path, what="tuning work directory"):
                pass
        with DirLock(tmp_path, wait=True):  # blocks until the holder lets go (after its 4 s)
            assert time.monotonic() - t_held > 3.0
            assert json.loads((tmp_path / ".tune.lock").read_text())["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.slow  # two real `tune` runs of the tiny model (about a minute on a loaded 2-core machine)
def test_second_tune_on_the_same_work_dir_is_refused(tmp_path):
    args = [sys.executable, "-m", "tuning.cli", "--arch", "cpu", "--model", "tiny", "--quantization", "q0f32",
            "--phases", "decode", "--batch-buckets", "1", "--trials-per-task", "2",
            "--database-dir", str(tmp_path / "databases"), "--work-dir", str(tmp_path / "work"), "--workers", "1"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lock = tmp_path / "work" / ".tune.lock"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if lock.is_file() and lock.read_text().strip():
                break
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-3000:]
        second = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert second.returncode == 1
        assert f"in use by pid {first.pid}" in second.stderr and "--wait" in second.stderr
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    # the one writer's work: every line parses, every record fits its workload
    work = TunedDatabase.open(tmp_path / "work", target=_cpu())
    assert work.bad_lines == [] and work.num_records > 0
    committed = TunedDatabase.open(tmp_path / "databases" / "local" / "cpu" / "tiny-q0f32", target=_cpu())
    assert committed.bad_lines == [] and committed.num_records > 0
    assert "committed" in out


def _cpu():
    from tuning.targets import make_target

    return make_target("cpu")
