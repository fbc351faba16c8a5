"""tuning.rpc: tracker/server processes on loopback, tracker checks, tuning through RPC."""

from __future__ import annotations

import os

import pytest

from tuning.database import open_database, record_latency_s
from tuning.rpc import (
    LocalRPC,
    RPCTrackerError,
    check_tracker,
    free_port,
    make_rpc_runner,
    no_device_help,
    parse_tracker,
)
from tuning.tasks import TuneTask, stored_trials
from tuning.tune import tune_tasks
from tuning.verify import verify_record

from .conftest import FAST, matmul_bias

KEY = "toy-cpu"


def test_parse_tracker():
    assert parse_tracker("10.0.0.5:9191") == ("10.0.0.5", 9191)
    assert parse_tracker("gpu-box") == ("gpu-box", 9190)
    assert parse_tracker("[::1]:9000") == ("::1", 9000)
    for bad in ("", ":9190", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_tracker(bad)


def test_no_device_help_names_both_commands_and_the_tune_form():
    msg = no_device_help("sm_86")
    assert "python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190" in msg
    assert "python -m tvm.exec.rpc_server --tracker 127.0.0.1:9190 --key sm_86 --no-fork" in msg
    assert "tune ... --arch sm_86 --rpc-tracker GPU_HOST:9190 --rpc-key sm_86" in msg


def test_unreachable_tracker_fails_clearly():
    port = free_port()
    with pytest.raises(RPCTrackerError, match=f"127.0.0.1:{port} is unreachable"):
        check_tracker("127.0.0.1", port, "x", timeout=2)


@pytest.fixture(scope="module")
def rpc():
    with LocalRPC(key=KEY) as r:
        pids = [r.tracker.proc.pid] + [s.proc.pid for s in r.servers]
        yield r
    for pid in pids:  # the context manager stopped them
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_tracker_lists_the_server(rpc):
    assert check_tracker(rpc.host, rpc.port, KEY, timeout=10)["free"] == 1
    with pytest.raises(RPCTrackerError, match=f"no server registered under key 'sm_90'.*{KEY}"):
        check_tracker(rpc.host, rpc.port, "sm_90", timeout=1)


@pytest.mark.slow  # 20-40 s (machine load): the RPC server links and loads every candidate
def test_tune_through_rpc_produces_records(rpc, tmp_path, cpu_target, measure):
    runner = make_rpc_runner(rpc.host, rpc.port, KEY, number=2, min_repeat_ms=20)
    db = tune_tasks([TuneTask("mm", matmul_bias())], target=cpu_target, work_dir=tmp_path,
                    max_trials_global=4, max_trials_per_task=4, builder=measure["builder"],
                    runner=runner, **FAST)
    n_search, n_base, best = stored_trials(db, matmul_bias())
    assert (n_search, n_base) == (4, 1)
    assert 0 < best < 1.0  # real timings, not the 1e10 of a failed candidate
    db = open_database(tmp_path, target=cpu_target)
    rec = db.query_tuning_record(matmul_bias(), cpu_target, "main")
    assert rec is not None and record_latency_s(rec) == pytest.approx(best)
    # the numerical check runs through the same tracker
    assert verify_record(rec, target=cpu_target, device_or_rpc=(rpc.host, rpc.port, KEY))


@pytest.mark.slow  # 30-90 s (machine load): two RPC servers, one killed mid-run
def test_a_server_killed_mid_run_loses_nothing(tmp_path, cpu_target, measure):
    """Two CPU servers under one key (real processes); one is SIGKILLed after the first measured
    batch. The run goes on on the other to its full budget, the failed trials are stored as
    failures, and the committed form holds one record, verified through the surviving server."""
    import signal

    from tuning.database import TunedDatabase, prune_best
    from tuning.verify import make_verifier

    key = "two-cpu"
    with LocalRPC(key=key, n_servers=2) as cluster:
        assert check_tracker(cluster.host, cluster.port, key)["free"] == 2
        runner = make_rpc_runner(cluster.host, cluster.port, key, number=2, min_repeat_ms=20, max_workers=2,
                                 session_timeout_sec=30)
        victim = cluster.servers[1]
        killed = []

        def kill_one(progress):
            if not killed:
                os.killpg(victim.proc.pid, signal.SIGKILL)
                killed.append(progress.trials_used)

        db = tune_tasks([TuneTask("mm", matmul_bias())], target=cpu_target, work_dir=tmp_path / "work",
                        max_trials_global=12, max_trials_per_task=12, builder=measure["builder"],
                        runner=runner, progress=kill_one, **FAST)
        assert killed and victim.proc.poll() is not None
        n_search, n_base, best = stored_trials(db, matmul_bias())
        assert (n_search, n_base) == (12, 1) and 0 < best < 1.0
        survivor = (cluster.host, cluster.port, key)
        assert check_tracker(*survivor)["free"] == 1
        kept = prune_best(tmp_path / "work", out_path=tmp_path / "committed",
                          verify=make_verifier(target=cpu_target, device_or_rpc=survivor, rtol=1e-4, atol=1e-5))
        committed = TunedDatabase.open(tmp_path / "committed", target=cpu_target)
        assert committed.bad_lines == [] and committed.num_records == 1 and list(kept.values()) == [pytest.approx(best)]
        rec = committed.ms.query_tuning_record(matmul_bias(), cpu_target, "main")
        assert verify_record(rec, target=cpu_target, device_or_rpc=survivor)


@pytest.mark.slow  # starts a tracker and RPC server processes (24 s of the default run on 2 cores)
def test_rpc_cluster_script_starts_all_servers_under_one_key(tmp_path):
    """scripts/rpc_cluster.py: tracker + N servers (CPU here), all registered before it says so."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(repo / "scripts" / "rpc_cluster.py"), "--key", "cluster-cpu",
                             "--servers", "2", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    try:
        first = proc.stdout.readline()
        assert "2 server(s) under key 'cluster-cpu'" in first and "all registered" in first, proc.stderr.read()
        assert f"--rpc-tracker 127.0.0.1:{port} --rpc-key cluster-cpu" in proc.stdout.readline()
        assert check_tracker("127.0.0.1", port, "cluster-cpu", timeout=5)["free"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    with pytest.raises(RPCTrackerError):  # the tracker went with it
        check_tracker("127.0.0.1", port, "cluster-cpu", timeout=2)
