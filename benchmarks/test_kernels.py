"""One pytest-benchmark per kernel and variant (see benchmarks/conftest.py for the options)."""

from __future__ import annotations

import pytest

from bench.kernels import random_args, time_kernel, tuned_kernel, untuned_kernel
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
    args = random_args(task.func, device=dev)
    device_us = stats(time_kernel(lib, args, device=dev, repeats=5,
                                  min_repeat_ms=10 if s.device.kind == "cuda" else 1)).median
    assert device_us > 0
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
