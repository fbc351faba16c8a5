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
    from gpt2_model.runtime import target_for

    config = get_config("tiny")
    params = random_params(config, seed=0)
    built = load_engine(config=config, quantization="q0f32", device="cpu", target=target_for("cpu"),
                        params_fp32=params, cache_dir=bench_cache, max_batch_size=4, max_total_seq_len=1024)
    return built, params
