"""MetaSchedule runners of the tuning driver, and one build-and-run helper for baselines.

A local runner measures on this machine's device of the target kind; :mod:`tuning.rpc` makes the
runner for remote cards (MetaSchedule's ``RPCRunner``).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import tvm
from tvm.ir import IRModule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RunnerInput
from tvm.target import Target

from .dbfiles import is_failed_run

__all__ = ["device_type", "make_local_runner", "mean_s", "measure"]


def make_local_runner(
    *,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 100,
    enable_cpu_cache_flush: bool = False,
    timeout_sec: float = 30.0,
):
    """MetaSchedule ``LocalRunner`` measuring on this machine's device of the target kind.

    Parameters
    ----------
    number, repeat, min_repeat_ms, enable_cpu_cache_flush
        MetaSchedule ``EvaluatorConfig`` (see :func:`tuning.rpc.make_rpc_runner`).
    timeout_sec : float
        Limit for one measurement.
    """
    return ms.runner.LocalRunner(
        timeout_sec=timeout_sec,
        evaluator_config=EvaluatorConfig(
            number=number,
            repeat=repeat,
            min_repeat_ms=min_repeat_ms,
            enable_cpu_cache_flush=enable_cpu_cache_flush,
        ),
    )


def device_type(target: Target) -> str:
    """Runner device type of a target: ``cpu`` for llvm, ``cuda`` for cuda, ..."""
    return str(tvm.runtime.device_from_target(target)).split(":")[0]


def measure(builder, runner, target: Target, mods: list[IRModule], args_info) -> list:
    """Build and run modules; per module the runner's run_secs (FloatImm list) or an error str."""
    build_results = builder.build([BuilderInput(m, target) for m in mods])
    out: list[Any] = [None] * len(mods)
    inputs, where = [], []
    for i, br in enumerate(build_results):
        if br.error_msg is not None:
            out[i] = f"build: {str(br.error_msg).strip().splitlines()[-1][:300]}"
        else:
            inputs.append(RunnerInput(br.artifact_path, device_type(target), args_info))
            where.append(i)
    if inputs:
        for i, fut in zip(where, runner.run(inputs)):
            res = fut.result()
            if res.error_msg is not None:
                out[i] = f"run: {str(res.error_msg).strip().splitlines()[-1][:300]}"
            else:
                out[i] = list(res.run_secs)
    for br in build_results:  # what MetaSchedule's RemoveBuildArtifact does
        if br.artifact_path is not None:
            shutil.rmtree(os.path.dirname(str(br.artifact_path)), ignore_errors=True)
    return out


def mean_s(run_secs) -> float:
    secs = [float(s) for s in run_secs]
    return float("inf") if is_failed_run(secs) else sum(secs) / len(secs)
