"""Fixtures of the bench tests: one library cache for the whole session (the tiny q0f32 CPU
library is built once, every later build is a cache hit) and an empty database tree."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory):
    """Library cache directory shared by every bench test."""
    return tmp_path_factory.mktemp("gpt2k-libs")


@pytest.fixture()
def empty_db_dir(tmp_path):
    """A database root with no database in it."""
    path = tmp_path / "databases"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_engine(bench_cache):
    """(built engine, fp32 params) of the tiny preset, q0f32, CPU, through bench.build."""
    from bench.build import load_engine
    from bench.peers import random_params
    from gpt2_model.config import get_config
    from tuning.engine import target_for

    config = get_config("tiny")
    params = random_params(config, seed=0)
    built = load_engine(config=config, quantization="q0f32", device="cpu", target=target_for("cpu"),
                        params_fp32=params, cache_dir=bench_cache, max_batch_size=4, max_total_seq_len=1024)
    return built, params


@pytest.fixture(scope="session")
def tiny_db_root(tmp_path_factory):
    """A database root holding a tiny q0f32 CPU database for the decode bucket b2.

    Made with the tuning driver at zero search trials: it stores the measured untuned
    schedules only (about 15 s), which is all bench needs to build and run the tuned variant
    (bucket entry points, database applied, records looked up).
    """
    from gpt2_model.config import get_config
    from tuning.engine import target_for
    from tuning.database import database_path
    from tuning.partition import partition
    from tuning.tune import TuneTask, tune_tasks

    root = tmp_path_factory.mktemp("databases")
    target = target_for("cpu")
    buckets = {"decode": [2]}
    tasks = partition(get_config("tiny"), quantization="q0f32", target=target, buckets=buckets)
    work = database_path(root, arch="cpu", model="tiny", quantization="q0f32")
    tune_tasks([TuneTask(name=t.name, mod=t.mod(), weight=t.weight) for t in tasks], target=target,
               work_dir=work, max_trials_global=0, max_trials_per_task=0, num_tuning_cores=2,
               meta={"model": "tiny", "quantization": "q0f32", "buckets": buckets})
    return root
