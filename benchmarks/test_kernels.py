"""One pytest-benchmark per kernel and variant (see benchmarks/conftest.py for the options)."""

from __future__ import annotations

import pytest

from bench.kernels import compare_outputs, random_args, time_kernel, tuned_kernel, untuned_kernel
from bench.timing import stats

pytestmark = pytest.mark.benchmark


def test_kernel(benchmark, gpt2k_suite, kernel_case):
    phase, bucket, index, variant = kernel_case
    s = gpt2k_suite
    tasks, prepared = s.parts[(phase, bucket)]
    task = tasks[index]
    if variant == "untuned":
        lib, has_record = untuned_kernel(task, prepared=prepared, target=s.target), None
    else:
        lib, has_record = tuned_kernel(task, prepared=prepared, database=s.database, target=s.target,
                                       untuned_us=s.untuned_us)
    dev = s.device.tvm_device()
    if variant == "tuned":  # a benchmark of a wrong kernel is worthless: check it against the untuned one first
        ref = untuned_kernel(task, prepared=prepared, target=s.target)
        err = compare_outputs(ref, lib, task.func, device=dev)
        assert err <= (1e-3 if s.quantization == "q0f32" else 2e-2), f"tuned {task.kernel} differs: rel err {err:.3g}"
    args = random_args(task.func, device=dev)
    samples = time_kernel(lib, args, device=dev, repeats=5, min_repeat_ms=10 if s.device.kind == "cuda" else 1)
    # time_evaluator ran at least min_repeat_ms per repeat: each sample is a real per-call figure
    assert len(samples) == 5 and all(0 < x < 1e7 for x in samples), samples
    device_us = stats(samples).median
    tag = f"b{bucket}" if phase == "decode" else f"s{bucket}"
    benchmark.group = f"{phase} {tag}"
    benchmark.extra_info.update({
        "model": s.model, "quantization": s.quantization, "device": s.device.name, "arch": s.arch,
        "kernel": task.kernel, "kind": task.kind, "variant": variant, "weight": task.weight,
        "untuned_from": f"symbolic:{task.twin_name}" if task.twin_name else "static",
        "tuned_record": has_record, "device_us": device_us, "flops": task.flops, "bytes": task.bytes,
        "achieved": ("TFLOP/s", task.flops / device_us / 1e6) if task.kind == "gemm"
        else ("GB/s", task.bytes / device_us / 1e3),
    })
    f = lib["main"]

    def call():
        f(*args)
        dev.sync()

    benchmark(call)
