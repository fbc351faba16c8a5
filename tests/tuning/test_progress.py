"""The tuning progress line's rate and ETA (``tuning.progress.ProgressCallback``), driven with the
arguments MetaSchedule passes after each measured batch, on a controlled clock."""

from __future__ import annotations

import types

import pytest

from tuning import progress as P


def _state(names, cap=64):
    return {"ids": list(names), "all": list(names), "round": 0, "used": {n: 0 for n in names},
            "cap": {n: cap for n in names}, "stored": {n: 0 for n in names},
            "best": {n: float("inf") for n in names}, "budget": cap * len(names),
            "global_left0": cap * len(names), "t0": 0.0}


def _batch(n, secs=1e-5):
    builds = [types.SimpleNamespace(error_msg=None) for _ in range(n)]
    runs = [types.SimpleNamespace(error_msg=None, run_secs=[secs]) for _ in range(n)]
    return builds, runs


def test_a_round_reported_in_a_burst_does_not_make_the_rate_absurd(monkeypatch):
    """MetaSchedule joins the first round's batches together: on an H200 five tasks' first batches
    were reported 0.2 s apart after 2m38s of work, and the line said 10,938 trials/min, ETA 1 s."""
    names = ["qkv", "proj", "fc1", "fc2", "lm_head"]
    state, lines = _state(names), []
    cb = P.ProgressCallback(state, lines.append)._inst  # the Python object MetaSchedule calls
    clock = {"t": 0.0}
    monkeypatch.setattr(P.time, "monotonic", lambda: clock["t"])
    for i, _name in enumerate(names):  # round 1: 32 trials each, all reported at ~158 s
        clock["t"] = 158.0 + 0.05 * i
        cb.apply(None, i, [None] * 32, *_batch(32))
    first_round = lines[-1]
    assert first_round.rate_per_min == pytest.approx(160 / 158.2 * 60, rel=1e-3)  # the session's average
    assert all(line.rate_per_min < 100 for line in lines)
    # later batches: one every 20 s of 32 trials -> 96 trials/min, measured from the end of round 1
    for k in range(1, 4):
        clock["t"] = 158.2 + 20.0 * k
        cb.apply(None, k % 5, [None] * 32, *_batch(32))
    last = lines[-1]
    assert last.rate_per_min == pytest.approx(96.0, rel=1e-6)
    left = 5 * 64 - last.session_trials
    assert last.eta_s == pytest.approx(left / 96.0 * 60, rel=1e-6)
    assert "96.0 trials/min" in last.format()


def test_best_times_and_failed_trials():
    state, lines = _state(["a"]), []
    cb = P.ProgressCallback(state, lines.append)._inst
    builds, runs = _batch(3, secs=2e-5)
    runs[1] = types.SimpleNamespace(error_msg="timeout", run_secs=None)
    runs[2] = types.SimpleNamespace(error_msg=None, run_secs=[1e-5, 1e-5])
    cb.apply(None, 0, [None] * 3, builds, runs)
    assert lines[-1].best_us["a"] == pytest.approx(10.0) and lines[-1].session_trials == 3
