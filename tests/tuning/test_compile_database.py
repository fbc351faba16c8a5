"""Compile with a database (issue 15): another model's database is refused naming the one that would
match; a database that tunes none of the build's kernels warns; a missing one names the path."""

from __future__ import annotations

import logging

import pytest

from gpt2_model.config import get_config
from tuning.apply import find_database
from tuning.compile import build_model
from tuning.database import DatabaseMismatchError, write_meta

from .test_database import make_db


@pytest.fixture()
def tiny():
    return get_config("tiny")


def _meta_only(path, target, **fields):
    make_db(path, target)  # toy matmul records: no kernel of the model
    write_meta(path, target=target, **fields)


def test_another_models_database_is_refused_naming_the_match(tmp_path, cpu_target, tiny):
    root = tmp_path / "databases"
    theirs = root / "local" / "cpu" / "gpt2-q0f32"
    ours = root / "local" / "cpu" / "tiny-q0f32"
    _meta_only(theirs, cpu_target, model="gpt2", config_hash=get_config("gpt2").model_hash(), quantization="q0f32")
    _meta_only(ours, cpu_target, model="tiny", config_hash=tiny.model_hash(), quantization="q0f32")
    with pytest.raises(DatabaseMismatchError) as info:
        build_model(tiny, quantization="q0f32", target=cpu_target, database=theirs)
    msg = str(info.value)
    assert "model hash" in msg and f"would match: {ours}" in msg and "\n" not in msg


def test_missing_database_names_the_path_looked_in(tmp_path, cpu_target, caplog):
    with caplog.at_level(logging.WARNING, "tuning.apply"):
        assert find_database(database=None, database_dir=tmp_path, target=cpu_target, model="tiny",
                             quantization="q0f32") is None
    (rec,) = [r for r in caplog.records if "no tuned database" in r.getMessage()]
    assert str(tmp_path / "local" / "cpu" / "tiny-q0f32") in rec.getMessage()
    assert "tune --arch cpu --model tiny --quantization q0f32" in rec.getMessage()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_database(database=tmp_path / "nope", database_dir=tmp_path, target=cpu_target, model="tiny",
                      quantization="q0f32")


def test_database_that_tunes_nothing_of_this_build_warns(tmp_path, cpu_target, tiny, caplog):
    db = tmp_path / "databases" / "local" / "cpu" / "tiny-q0f32"
    _meta_only(db, cpu_target, model="tiny", config_hash=tiny.model_hash(), quantization="q0f32",
               buckets={"decode": [2]})
    with caplog.at_level(logging.WARNING, "tuning.compile"):
        res = build_model(tiny, quantization="q0f32", target=cpu_target, database=db)
    assert res.coverage.tuned == 0 and res.coverage.total > 0
    (rec,) = [r for r in caplog.records if "tunes 0 of the" in r.getMessage()]
    assert str(db) in rec.getMessage() and "would match is" in rec.getMessage()
