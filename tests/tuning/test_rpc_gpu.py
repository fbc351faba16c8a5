"""tuning.rpc on a GPU box (marked gpu): two RPC servers sharing one GPU, real processes.

Issue 16 asks for 1 vs 2 cards; where no two-GPU machine is lent, this is the part one GPU allows:
the cluster of one tracker and two ``--no-fork`` servers under one key on a real card, the same
fixed-seed tuning job measured by the local runner and over RPC (the printed trials per minute
are not a scaling figure: both servers share the card), and a server SIGKILLed mid-run with the
run finishing on the other and the committed record verified through the survivor.
Run: ``python -m pytest -m gpu tests/tuning/test_rpc_gpu.py -s``. Not yet seen to pass: its only
run (2026-12-01, H200) hit the device call's time limit before finishing.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tuning.database import TunedDatabase, prune_best
from tuning.rpc import LocalRPC, check_tracker, make_rpc_runner
from tuning.runner import make_local_runner
from tuning.tasks import TuneTask, stored_trials
from tuning.tune import tune_tasks
from tuning.verify import make_verifier, verify_record

from .conftest import matmul_bias

pytestmark = pytest.mark.gpu

TRIALS = 8  # 2026-12-01: 16 trials x 3 runs did not finish in 170 s on the H200 box (builds dominate)
KEY = "one-gpu-two-servers"


def _target():
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel
    from tuning.targets import make_target  # pylint: disable=import-outside-toplevel

    return make_target(detect_cuda_arch())


def _tune(target, work_dir, runner, progress=None):
    mod = matmul_bias(256, 256, 256)
    t0 = time.perf_counter()
    db = tune_tasks([TuneTask("mm", mod)], target=target, work_dir=work_dir, max_trials_global=TRIALS,
                    max_trials_per_task=TRIALS, runner=runner, progress=progress, num_trials_per_iter=4, seed=0,
                    strategy_options=dict(population_size=32, init_min_unmeasured=8))
    wall = time.perf_counter() - t0
    n_search, n_base, best = stored_trials(db, mod)
    return {"wall_s": wall, "trials": n_search, "baseline": n_base, "best_us": best * 1e6,
            "trials_per_min": 60.0 * (n_search + n_base) / wall}


def _phase(msg: str, t0: float = time.perf_counter()) -> None:
    """A progress line at once (a device call's time limit must not swallow where it stood)."""
    print(f"[rpc-gpu {time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def test_two_servers_sharing_one_gpu_tune_and_survive_a_kill(tmp_path):
    target = _target()
    _phase(f"target {target.attrs.get('arch')}: tuning with the local runner")
    local = _tune(target, tmp_path / "local", make_local_runner(min_repeat_ms=20))
    _phase(f"local runner done: {local}; starting a tracker and two servers on GPU 0")
    with LocalRPC(key=KEY, n_servers=2, devices=["0", "0"]) as cluster:
        assert check_tracker(cluster.host, cluster.port, KEY)["free"] == 2
        _phase("both servers registered; tuning over RPC")
        runner = make_rpc_runner(cluster.host, cluster.port, KEY, min_repeat_ms=20, max_workers=2,
                                 session_timeout_sec=60)
        rpc = _tune(target, tmp_path / "rpc", runner)
        _phase(f"rpc done: {rpc}; tuning again, one server killed mid-run")
        victim, killed = cluster.servers[1], []

        def kill_one(progress):
            if not killed:
                os.killpg(victim.proc.pid, signal.SIGKILL)
                killed.append(progress.trials_used)

        runner = make_rpc_runner(cluster.host, cluster.port, KEY, min_repeat_ms=20, max_workers=2,
                                 session_timeout_sec=60)
        after_kill = _tune(target, tmp_path / "killed", runner, progress=kill_one)
        assert killed and victim.proc.poll() is not None
        _phase(f"run with a kill done: {after_kill}; verifying through the survivor")
        survivor = (cluster.host, cluster.port, KEY)
        assert check_tracker(*survivor)["free"] == 1
        kept = prune_best(tmp_path / "killed", out_path=tmp_path / "committed",
                          verify=make_verifier(target=target, device_or_rpc=survivor))
        committed = TunedDatabase.open(tmp_path / "committed", target=target)
        assert committed.bad_lines == [] and committed.num_records == 1 and len(kept) == 1
        rec = committed.ms.query_tuning_record(matmul_bias(256, 256, 256), target, "main")
        assert verify_record(rec, target=target, device_or_rpc=survivor)
    for name, r in (("local runner", local), ("rpc, 2 servers on 1 GPU", rpc), ("rpc, one killed", after_kill)):
        print(f"{name:>24}: {r['trials']} search + {r['baseline']} baseline trials in {r['wall_s']:.1f} s "
              f"({r['trials_per_min']:.0f} trials/min), best {r['best_us']:.2f} us")
        assert r["trials"] == TRIALS and r["baseline"] == 1 and r["best_us"] > 0
