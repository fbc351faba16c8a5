"""The structural-hash invariant of ``tuning.pipeline``: a kernel keyed while tuning (partition) is
found again, by MetaSchedule's own lookup, in the module compile prepares.

Tuning partitions a module exported with the tuned buckets only; compile exports with its
default buckets plus the database's, in another order, so the two modules differ. Every tuning
key must still be found, and a different preparation must break it (the test can fail).
"""

from __future__ import annotations

import pytest
import tvm
from tvm import relax
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from gpt2_model.config import get_config
from gpt2_model.export import export_model
from tuning.apply import apply_database
from tuning.partition import attach_twins, partition, tasks_of
from tuning.pipeline import prepare, preparation_passes
from tuning.targets import make_target

TUNED = {"decode": [2], "prefill": [32]}
COMPILED = {"prefill": [64, 32], "decode": [4, 2, 1]}  # compile: more buckets, another order


def _database_of(tasks, target) -> ms.database.MemoryDatabase:
    """One record per tuning task (a trace that only looks its blocks up, 1 us), keyed the way tune
    keys them. (MetaSchedule's lookups skip records with an empty trace.)"""
    db = ms.database.MemoryDatabase(module_equality="structural")
    for task in tasks:
        mod = task.mod()
        sch = Schedule(mod)
        sch.get_child_blocks(sch.get_sblock("root", func_name="main"))
        workload = db.commit_workload(mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [tvm.tirx.FloatImm("float32", 1e-6)], target,
            ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        assert db.query_tuning_record(mod, target, "main") is not None
    return db


@pytest.fixture(scope="module")
def tiny():
    return get_config("tiny")


@pytest.mark.parametrize("arch", ["cpu", "sm_90"])
def test_every_tuning_key_is_found_in_the_compile_module(tiny, arch):
    target = make_target(arch)
    tuned = partition(tiny, quantization="q0f32", target=target, buckets=TUNED)
    assert len({t.name for t in tuned}) == len(tuned) > 4
    db = _database_of(tuned, target)

    exported = export_model(tiny, quantization="q0f32", target=target, buckets=COMPILED)
    prepared = prepare(exported.mod, target=target)
    compiled = attach_twins(prepared, tasks_of(prepared, COMPILED))
    # Kernel names are numbered by export order and differ between the two modules, and a kernel
    # shared by several buckets is listed once; the key is the structural hash.
    compile_keys = _database_of(compiled, target)
    for task in tuned:
        assert compile_keys.has_workload(task.mod()), f"{task.name}: tuning key not in the compile module"
    found = [t for t in compiled if db.has_workload(t.mod())]
    # and what compile really does with it: every kernel with a record is swapped in, nothing else
    _, applied = apply_database(prepared, database=db, target=target, task_list=compiled)
    assert sorted(applied) == sorted(t.kernel for t in found) and applied


def test_another_preparation_breaks_the_keys(tiny):
    """The property is not vacuous: without FuseTransposeMatmul the matmul kernels change and
    their tuning keys are no longer found."""
    target = make_target("cpu")
    tuned = partition(tiny, quantization="q0f32", target=target, buckets=TUNED)
    db = _database_of(tuned, target)
    exported = export_model(tiny, quantization="q0f32", target=target, buckets=COMPILED)
    passes = [p for p in preparation_passes(target) if "FuseTransposeMatmul" not in str(p)]
    assert len(passes) == len(preparation_passes(target)) - 1
    with target:
        other = tvm.transform.Sequential(passes)(exported.mod)
    tasks = tasks_of(other, COMPILED)
    missing = [t.name for t in tasks if t.kind in ("gemv", "gemm") and not db.has_workload(t.mod())]
    assert missing, "a different preparation should change the matmul keys"
    assert isinstance(relax.transform.FuseTransposeMatmul(), tvm.transform.Pass)
