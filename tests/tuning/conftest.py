"""Fixtures of the tuning tests: a toy matmul+bias kernel, a CPU target, one shared tuning run.

Everything runs on the host CPU (llvm) with tiny trial counts. The one shared tuning run
(`tuned`) is reused by the tests that only read a database; tests that tune again copy it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import te, tirx

#: Search settings that keep one batch at a few seconds on a loaded 2-core machine.
FAST = dict(
    num_trials_per_iter=4,
    seed=0,
    strategy_options=dict(population_size=32, init_min_unmeasured=8),
    num_tuning_cores=1,
)
TRIALS = 8  # search trials of the shared run


def matmul_bias(n=64, k=64, m=64, *, symbolic: bool = False) -> tvm.IRModule:
    """IRModule {"main": D = A @ B + bias}; with ``symbolic`` the row count is a variable ``n``."""
    if symbolic:  # int64 dims throughout, as in relax-generated kernels
        rows, k, m = tirx.Var("n", "int64"), tirx.IntImm("int64", k), tirx.IntImm("int64", m)
    else:
        rows = n
    a = te.placeholder((rows, k), name="A")
    b = te.placeholder((k, m), name="B")
    bias = te.placeholder((m,), name="bias")
    r = te.reduce_axis((tirx.IntImm("int64", 0) if symbolic else 0, k), name="k")
    c = te.compute((rows, m), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="C")
    d = te.compute((rows, m), lambda i, j: c[i, j] + bias[j], name="D")
    return tvm.IRModule({"main": te.create_prim_func([a, b, bias, d])})


def matmul_bias_reference(a, b, bias):
    return (a.astype(np.float64) @ b.astype(np.float64) + bias).astype(np.float32)


@pytest.fixture(scope="session")
def cpu_target():
    from tuning.targets import make_target

    return make_target("cpu", num_cores=1)


@pytest.fixture(scope="session")
def measure(cpu_target):
    """Builder and runner shared by in-process tuning runs (their workers start only once)."""
    from tuning.builder import PersistentLocalBuilder
    from tuning.runner import make_local_runner

    builder = PersistentLocalBuilder(max_workers=1)
    yield dict(builder=builder, runner=make_local_runner(min_repeat_ms=20))
    builder.shutdown()


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, cpu_target, measure):
    """One tuning run: (work_dir, progress reports). Task "mm" with a symbolic untuned variant."""
    from tuning.tune import TuneTask, tune_tasks

    work_dir = tmp_path_factory.mktemp("tuned")
    reports = []
    task = TuneTask("mm", matmul_bias(), 2.0, untuned_mod=matmul_bias(symbolic=True))
    tune_tasks([task], target=cpu_target, work_dir=work_dir, max_trials_global=TRIALS,
               max_trials_per_task=TRIALS, progress=reports.append, meta={"model": "toy"},
               **measure, **FAST)
    return Path(work_dir), reports


@pytest.fixture
def tuned_copy(tuned, tmp_path):
    """A private copy of the shared tuning run's directory."""
    dst = tmp_path / "copy"
    shutil.copytree(tuned[0], dst, ignore=shutil.ignore_patterns("logs"))
    return dst
