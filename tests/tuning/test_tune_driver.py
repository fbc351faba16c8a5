"""tuning.tune: the MetaSchedule driver on CPU (llvm) with a toy matmul+bias and few trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from tuning.database import (
    RECORD_FILE,
    open_database,
    prune_best,
    read_meta,
    record_latency_s,
)
from tuning.targets import make_target
from tuning.tasks import TuneTask, is_search_record, stored_trials
from tuning.tune import tune_tasks
from tuning.untuned import untuned_schedule
from tuning.verify import make_verifier, verify_record

from .conftest import FAST, TRIALS, matmul_bias, matmul_bias_reference

REPO = Path(__file__).resolve().parents[2]


def _run_numpy(mod, target, seed=0):
    """Build ``mod`` for ``target``, run on CPU, compare with NumPy; returns max abs error."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (64, 64)).astype("float32")
    b = rng.uniform(-1, 1, (64, 64)).astype("float32")
    bias = rng.uniform(-1, 1, (64,)).astype("float32")
    lib = tvm.compile(mod, target=target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((64, 64), "float32"), device=dev)
    lib["main"](*(tvm.runtime.tensor(x, device=dev) for x in (a, b, bias)), out)
    return float(np.abs(out.numpy() - matmul_bias_reference(a, b, bias)).max())


def test_tune_writes_database_with_meta_and_records(tuned, cpu_target):
    work_dir, _ = tuned
    meta = read_meta(work_dir)
    assert meta["arch"] == "cpu" and meta["model"] == "toy"
    assert meta["trials_used"] == TRIALS and meta["tasks"] == ["mm"]
    assert meta["max_trials_global"] == meta["max_trials_per_task"] == TRIALS
    assert meta["tvm_version"] == tvm.__version__
    db = open_database(work_dir, target=cpu_target)
    n_search, n_base, best = stored_trials(db, matmul_bias())
    assert (n_search, n_base) == (TRIALS, 1)
    rec = db.query_tuning_record(matmul_bias(), cpu_target, "main")
    assert rec is not None and record_latency_s(rec) == pytest.approx(best)
    # the stored best schedule computes the right thing (NumPy reference, fp32 tolerance)
    sch = db.query_schedule(matmul_bias(), cpu_target, "main")
    assert _run_numpy(sch.mod, cpu_target) < 1e-4


def test_progress_is_reported_per_batch(tuned):
    _, reports = tuned
    assert len(reports) == TRIALS // FAST["num_trials_per_iter"]
    used = [r.trials_used for r in reports]
    assert used == sorted(used) and used[-1] == TRIALS
    last = reports[-1]
    assert last.trials_budget == TRIALS and last.tasks_done == last.n_tasks == 1
    assert reports[0].eta_s is not None and reports[0].eta_s >= 0
    assert last.best_us["mm"] is not None and last.best_us["mm"] > 0
    line = last.format()
    assert "trials 8/8" in line and "tasks done 1/1" in line and "mm: best" in line and "ETA" in line


def test_untuned_baseline_is_measured_and_stored(tuned, cpu_target):
    work_dir, _ = tuned
    table = json.loads((work_dir / "untuned.json").read_text())["mm"]
    assert table["candidates_us"]["static"] > 0
    assert table["candidates_us"]["symbolic"] > 0  # the symbolic variant, run at n=64
    assert table["untuned_us"] == table["candidates_us"]["symbolic"]
    db = open_database(work_dir, target=cpu_target)
    base = [r for r in db.get_all_tuning_records() if not is_search_record(r)]
    assert len(base) == 1
    assert len(base[0].trace.insts) == 0  # llvm: the unscheduled function
    assert record_latency_s(base[0]) * 1e6 == pytest.approx(table["baseline_record_us"], rel=1e-5)


def test_pruned_form_has_one_verified_record_not_slower_than_untuned(tuned, cpu_target, tmp_path):
    work_dir, _ = tuned
    db = open_database(work_dir, target=cpu_target)
    base = next(r for r in db.get_all_tuning_records() if not is_search_record(r))
    summary = prune_best(work_dir, out_path=tmp_path, verify=make_verifier(target=cpu_target))
    pruned = open_database(tmp_path, target=cpu_target)
    recs = pruned.get_all_tuning_records()
    assert len(recs) == 1 and summary[0] is not None
    assert record_latency_s(recs[0]) <= record_latency_s(base)
    assert record_latency_s(recs[0]) == pytest.approx(
        min(record_latency_s(r) for r in db.get_all_tuning_records()))
    assert read_meta(tmp_path)["pruned"] is True


def _bad_record(db, mod, target, secs):
    """A record whose schedule silently keeps the accumulator in float16 (numerically wrong)."""
    sch = Schedule(mod)
    sch.unsafe_set_dtype(sch.get_sblock("C"), 0, "float16")
    rec = ms.database.TuningRecord(sch.trace, db.commit_workload(mod),
                                   [tvm.tirx.FloatImm("float32", secs)], target,
                                   ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    db.commit_tuning_record(rec)
    return rec


def _split_record(db, mod, target, secs):
    """A correct record: the unscheduled function with its first loop split by 8."""
    sch = Schedule(mod)
    i, _, _ = sch.get_loops(sch.get_sblock("C"))
    sch.split(i, factors=[None, 8])
    rec = ms.database.TuningRecord(sch.trace, db.commit_workload(mod),
                                   [tvm.tirx.FloatImm("float32", secs)], target,
                                   ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    db.commit_tuning_record(rec)
    return rec


def test_verify_record_rejects_wrong_schedule_and_prune_falls_back(tmp_path, cpu_target):
    mod = matmul_bias()
    db = open_database(tmp_path, target=cpu_target, create=True)
    bad = _bad_record(db, mod, cpu_target, 1e-6)
    good = _split_record(db, mod, cpu_target, 5e-6)
    assert verify_record(good, target=cpu_target, rtol=1e-5, atol=1e-5) is True
    assert verify_record(bad, target=cpu_target, rtol=1e-5, atol=1e-5) is False
    summary = prune_best(tmp_path, out_path=tmp_path / "out",
                         verify=make_verifier(target=cpu_target, rtol=1e-5, atol=1e-5))
    assert summary[0] == pytest.approx(5e-6)  # the faster, wrong record was skipped
    kept = open_database(tmp_path / "out", target=cpu_target).get_all_tuning_records()
    assert len(kept) == 1
    assert [i.kind.name for i in kept[0].trace.insts][-1] == "Split"  # the good record


def test_prune_trusts_committed_records_and_verifies_new_ones(tmp_path, cpu_target):
    """A record already in the committed database (verified when committed) is not checked again;
    a new, faster record is, and a wrong one still loses to the trusted one."""
    mod = matmul_bias()
    db = open_database(tmp_path / "work", target=cpu_target, create=True)
    good = _split_record(db, mod, cpu_target, 5e-6)
    prune_best(tmp_path / "work", out_path=tmp_path / "db", verify=make_verifier(target=cpu_target))
    _bad_record(db, mod, cpu_target, 1e-6)  # a faster, wrong record from a later run
    checked, lines = [], []

    def verify(record):
        checked.append(record_latency_s(record))
        return verify_record(record, target=cpu_target, rtol=1e-5, atol=1e-5)

    summary = prune_best(tmp_path / "work", out_path=tmp_path / "db", trusted=tmp_path / "db",
                         verify=verify, log=lines.append)
    assert checked == [pytest.approx(1e-6)]  # only the new record was run; the committed one was trusted
    assert summary[0] == pytest.approx(5e-6)
    assert lines == ["verify 1/1: workload 0 (1.00 us)"]
    # nothing new: nothing to check
    checked.clear()
    prune_best(tmp_path / "db", trusted=tmp_path / "db", verify=verify)
    assert checked == []


def test_resume_spends_only_the_remaining_budget(tuned_copy, cpu_target, measure):
    untuned_before = (tuned_copy / "untuned.json").read_text()
    reports = []
    db = tune_tasks([TuneTask("mm", matmul_bias())], target=cpu_target, work_dir=tuned_copy,
                    max_trials_global=12, max_trials_per_task=12, progress=reports.append,
                    **measure, **FAST)
    assert stored_trials(db, matmul_bias())[:2] == (12, 1)  # baseline not measured again
    assert reports[-1].session_trials == 4 and reports[-1].trials_used == 12
    assert (tuned_copy / "untuned.json").read_text() == untuned_before
    # budgets already spent: nothing is measured
    reports.clear()
    db = tune_tasks([TuneTask("mm", matmul_bias())], target=cpu_target, work_dir=tuned_copy,
                    max_trials_global=100, max_trials_per_task=12, progress=reports.append,
                    **measure, **FAST)
    assert reports == [] and stored_trials(db, matmul_bias())[:2] == (12, 1)


_KILL_SCRIPT = """
import sys
from tests.tuning.conftest import FAST, matmul_bias
from tuning.targets import make_target
from tuning.tune import TuneTask, tune_tasks
tune_tasks([TuneTask("mm", matmul_bias())], target=make_target("cpu", num_cores=1),
           work_dir=sys.argv[1], max_trials_global=400, max_trials_per_task=400, **FAST)
"""


@pytest.mark.slow  # 17-50 s (machine load): a second process starts TVM and tunes, then dies
def test_sigkill_mid_run_then_resume(tmp_path, cpu_target, measure):
    work_dir = tmp_path / "db"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(work_dir)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    records = work_dir / RECORD_FILE
    deadline = time.monotonic() + 240
    try:
        # wait for the untuned record and some search records, then kill the whole run
        while time.monotonic() < deadline and proc.poll() is None:
            if records.exists() and len(records.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    lines = records.read_text().splitlines()
    assert len(lines) >= 3
    # a kill inside a write leaves half a line: make it so
    with open(records, "a") as f:
        f.write(lines[-1][: len(lines[-1]) // 2])
    with pytest.warns(UserWarning, match="quarantined"):
        db = tune_tasks([TuneTask("mm", matmul_bias())], target=cpu_target, work_dir=work_dir,
                        max_trials_global=8, max_trials_per_task=8, **measure, **FAST)
    n_search, n_base, _ = stored_trials(db, matmul_bias())
    assert n_base == 1  # the untuned record survived the kill and was not measured again
    assert n_search == max(8, len(lines) - 1)  # resumed up to the budget (or past it already)
    db = open_database(work_dir, target=cpu_target)  # loads cleanly now
    assert db.query_tuning_record(matmul_bias(), cpu_target, "main") is not None


def test_bad_tasks_are_rejected(tmp_path, cpu_target):
    with pytest.raises(ValueError, match="symbolic dims.*bucket"):
        tune_tasks([TuneTask("sym", matmul_bias(symbolic=True))], target=cpu_target,
                   work_dir=tmp_path, max_trials_global=4, max_trials_per_task=4)
    with pytest.raises(ValueError, match="duplicate task name"):
        tune_tasks([TuneTask("a", matmul_bias()), TuneTask("a", matmul_bias(32, 32, 32))],
                   target=cpu_target, work_dir=tmp_path, max_trials_global=4,
                   max_trials_per_task=4)
    with pytest.raises(ValueError, match="same workload"):
        tune_tasks([TuneTask("a", matmul_bias()), TuneTask("b", matmul_bias())],
                   target=cpu_target, work_dir=tmp_path, max_trials_global=4,
                   max_trials_per_task=4)
    with pytest.raises(ValueError, match="no tasks"):
        tune_tasks([], target=cpu_target, work_dir=tmp_path, max_trials_global=4,
                   max_trials_per_task=4)


def test_gpu_untuned_schedule_is_a_replayable_dlight_trace(tmp_path):
    target = make_target("sm_90")
    mod = matmul_bias()
    sch = untuned_schedule(mod, target=target)
    kinds = [i.kind.name for i in sch.trace.insts]
    assert "Bind" in kinds and "EnterPostproc" not in kinds
    replay = Schedule(mod)
    sch.trace.apply_to_schedule(replay, remove_postproc=False)
    assert tvm_ffi.structural_equal(replay.mod, sch.mod)
    # through a JSON database and back
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))
    rec = ms.database.TuningRecord(sch.trace, db.commit_workload(mod),
                                   [tvm.tirx.FloatImm("float32", 1e-5)], target,
                                   ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    db.commit_tuning_record(rec)
    assert not is_search_record(rec)
    loaded = open_database(tmp_path, target=target).query_schedule(mod, target, "main")
    assert tvm_ffi.structural_equal(loaded.mod, sch.mod)


@pytest.mark.gpu
def test_gpu_tune_verify_prune(tmp_path):
    """On a local GPU: dlight baseline stored, search, numerical check on the GPU, pruned best."""
    from gpt2_model.device import detect_cuda_arch
    from tuning.targets import KNOWN_ARCHS

    arch = detect_cuda_arch()
    if arch not in KNOWN_ARCHS:
        pytest.skip(f"local GPU arch {arch} has no target preset")
    target = make_target(arch)
    mod = matmul_bias(256, 256, 256)
    reports = []
    db = tune_tasks([TuneTask("mm", mod, untuned_mod=matmul_bias(256, 256, 256, symbolic=True))],
                    target=target, work_dir=tmp_path / "work", max_trials_global=16,
                    max_trials_per_task=16, num_trials_per_iter=8, seed=0,
                    progress=reports.append)
    n_search, n_base, best = stored_trials(db, mod)
    assert n_search == 16 and n_base >= 1 and best < 1.0
    assert reports[-1].trials_used == 16
    base = [r for r in db.get_all_tuning_records() if not is_search_record(r)]
    assert all("Bind" in [i.kind.name for i in r.trace.insts] for r in base)  # dlight schedules
    table = json.loads((tmp_path / "work" / "untuned.json").read_text())["mm"]
    assert table["candidates_us"]["static"] > 0 and table["candidates_us"]["symbolic"] > 0
    summary = prune_best(tmp_path / "work", out_path=tmp_path / "db",
                         verify=make_verifier(target=target, rtol=1e-3, atol=1e-3))
    assert summary[0] is not None
    assert summary[0] <= min(record_latency_s(r) for r in base)
    # the committed schedule against NumPy, on the GPU
    sch = open_database(tmp_path / "db", target=target).query_schedule(mod, target, "main")
    rng = np.random.default_rng(1)
    a, b = (rng.uniform(-1, 1, (256, 256)).astype("float32") for _ in range(2))
    bias = rng.uniform(-1, 1, (256,)).astype("float32")
    dev = tvm.cuda(0)
    lib = tvm.compile(sch.mod, target=target)
    out = tvm.runtime.tensor(np.zeros((256, 256), "float32"), device=dev)
    lib["main"](*(tvm.runtime.tensor(x, device=dev) for x in (a, b, bias)), out)
    np.testing.assert_allclose(out.numpy(), matmul_bias_reference(a, b, bias), rtol=1e-4, atol=1e-4)


def test_search_time_limit_stops_new_batches_and_keeps_what_was_measured(tmp_path, cpu_target, measure):
    """``search_seconds`` (``tune --search-minutes``): once it is over no batch starts, the run ends
    normally with what was measured stored, and a rerun without the limit resumes the budget. On an
    H200 a run killed by an outside limit after its search lost everything (2026-12-02)."""
    lines, reports = [], []
    work = tmp_path / "work"
    db = tune_tasks([TuneTask("mm", matmul_bias())], target=cpu_target, work_dir=work, max_trials_global=400,
                    max_trials_per_task=400, progress=reports.append, log=lines.append, search_seconds=1e-3,
                    **measure, **FAST)
    n_after_limit = stored_trials(db, matmul_bias())[0]
    assert n_after_limit < 400 and sum(r.session_trials > 0 for r in reports) <= 1
    assert any("time limit of" in line and "reached" in line for line in lines), lines
    assert (work / RECORD_FILE).is_file() and read_meta(work)["trials_used"] == n_after_limit
    lines.clear()
    db = tune_tasks([TuneTask("mm", matmul_bias())], target=cpu_target, work_dir=work, max_trials_global=8,
                    max_trials_per_task=8, progress=reports.append, log=lines.append, **measure, **FAST)
    assert stored_trials(db, matmul_bias())[0] == max(8, n_after_limit)
    assert not any("time limit" in line for line in lines)


def test_search_minutes_must_be_positive():
    from tuning.config import TuneConfig, TuneError

    for bad in (0, -1.0, float("nan")):
        with pytest.raises(TuneError, match="--search-minutes"):
            TuneConfig(arch="cpu", search_minutes=bad)


def test_attention_templates_are_checked_and_reach_the_config():
    """``tune --attention-templates``: a comma list of known families, one clear error otherwise."""
    from tuning.cli import build_parser, config_from_args
    from tuning.config import TuneConfig, TuneError

    args = build_parser().parse_args(["--arch", "sm_90", "--kinds", "attention", "--attention-templates", "mma,tc"])
    assert config_from_args(args).attention_templates == ("mma", "tc")
    assert TuneConfig(arch="sm_90").attention_templates is None  # default: every family
    for bad in ("wgmma", "mma,foo", ","):
        with pytest.raises(TuneError, match="--attention-templates"):
            TuneConfig(arch="sm_90", attention_templates=bad)


def test_attention_templates_narrow_the_prefill_search_and_keep_the_stored_choice(tmp_path, monkeypatch):
    """The driver passes ``--attention-templates``' families (plus TVM's kernel and the stored
    choice) to the attention search; without the flag the search gets no list (every family)."""
    import shutil as _shutil

    from gpt2_model.config import get_config
    from gpt2_model.quantization import get_scheme
    from tuning import driver
    from tuning.attention import RAGGED_PREFILL, TCConfig, attention_key, read_attention, stored_best
    from tuning.attention_tc import mma_candidates
    from tuning.config import TuneConfig
    from tuning.targets import make_target

    committed = tmp_path / "db"
    _shutil.copytree("databases/sm_90/gpt2-q0f16", committed)
    seen = []

    def fake_tune_attention(model_cfg, *, candidates=None, **kw):
        seen.append(candidates)
        return {"kernels": [{"kernel": RAGGED_PREFILL, "candidates": 0, "best": {"score": 0.5}}]}

    monkeypatch.setattr(driver, "tune_attention", fake_tune_attention)
    target, cfg = make_target("sm_90"), get_config("gpt2")
    scheme = get_scheme("q0f16")
    for templates in (("mma",), None):
        config = TuneConfig(arch="sm_90", attention_templates=templates)
        driver._tune_attention(config, model_cfg=cfg, scheme=scheme, target=target, committed=committed,  # pylint: disable=protected-access
                               lengths=[128, 512, 1024], remote=False, meta={})
    narrowed, full = seen
    assert full is None
    key = attention_key(cfg, scheme.activation_dtype)
    entry = next(e for e in read_attention(committed)["kernels"] if e["kernel"] == RAGGED_PREFILL)
    stored = stored_best(entry)  # the committed database's prefill choice
    assert stored in narrowed and set(mma_candidates(key, target)) <= set(narrowed)
    assert not any(isinstance(c, TCConfig) and not c.mma and c != stored for c in narrowed)
