"""Kernel micro-benchmarks (pytest-benchmark), not part of the default test run.

    pytest benchmarks/ --benchmark-only                                  # gpt2 on CUDA, tiny on CPU
    pytest benchmarks/ --benchmark-only --gpt2k-model gpt2-medium --gpt2k-batch 1,8 --gpt2k-seq-len 512
    pytest benchmarks/ --benchmark-only --benchmark-json out.json       # pytest-benchmark's JSON

One benchmark per (phase bucket, kernel, variant): every kernel of the partition
(``tuning.partition``) at the decode batch and prefill chunk buckets given, ``untuned`` (what the
untuned library runs: the symbolic-shape twin under dlight) and ``tuned`` (the database's
schedule; only when ``databases/<arch>/<model>-<quant>/`` exists). Benchmarks are grouped by
phase bucket (``decode b8``, ``prefill s1024``). pytest-benchmark's own statistics are host
wall times of call + device sync; the device-timer figure (TVM ``time_evaluator``, median us per
call) and the kernel's FLOPs, bytes and achieved GB/s or TFLOP/s are in ``extra_info``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("gpt2k", "gpt2-kernels micro-benchmarks")
    g.addoption("--gpt2k-model", default=None, help="preset or HF dir (default: gpt2 on CUDA, tiny on CPU)")
    g.addoption("--gpt2k-quantization", default=None,
                help="q0f16, q0f32, q4f16_1 (default: q0f16 on CUDA, q0f32 on CPU)")
    g.addoption("--gpt2k-device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.addoption("--gpt2k-batch", default="8", help="decode batch buckets, comma list (default 8)")
    g.addoption("--gpt2k-seq-len", default="128", help="prefill chunk buckets, comma list (default 128)")
    g.addoption("--gpt2k-database-dir", default="databases", help="database root (default databases)")


class Suite:
    """Everything resolved once per session: device, target, config, database, tasks."""

    def __init__(self, config):
        from bench import env as envmod
        from bench.build import locate_database
        from bench.config import default_quantization, positive_ints
        from bench.kernels import bucket_tasks
        from gpt2_model.config import get_config, model_name
        from tuning.engine import target_for

        opt = config.getoption
        self.device = envmod.resolve_device(opt("--gpt2k-device"))
        model = opt("--gpt2k-model") or ("gpt2" if self.device.kind == "cuda" else "tiny")
        self.quantization = opt("--gpt2k-quantization") or default_quantization(self.device.kind)
        self.arch = envmod.arch_of(self.device)
        self.target = target_for(self.device.name, None if self.device.kind == "cpu" else self.arch)
        self.config = get_config(model)
        self.model = model_name(model)
        db_info, _ = locate_database(database_dir=opt("--gpt2k-database-dir"), model=self.model,
                                   quantization=self.quantization, target=self.target,
                                   model_hash=self.config.model_hash())
        self.untuned_us = db_info.db.untuned_us if db_info else {}
        self.database = db_info.db.ms if db_info else None  # the records, for MetaSchedule's queries
        self.buckets = [("decode", b) for b in positive_ints(opt("--gpt2k-batch"), name="gpt2k-batch")]
        self.buckets += [("prefill", s) for s in positive_ints(opt("--gpt2k-seq-len"), name="gpt2k-seq-len")]
        self.parts = {}
        for phase, bucket in self.buckets:
            self.parts[(phase, bucket)] = bucket_tasks(self.config, quantization=self.quantization,
                                                       target=self.target, phase=phase, bucket=bucket)

    def cases(self):
        variants = ["untuned"] + (["tuned"] if self.database is not None else [])
        for (phase, bucket), (tasks, _) in self.parts.items():
            for i, task in enumerate(tasks):
                for v in variants:
                    yield (phase, bucket, i, v), f"{phase}-{bucket}-{task.kernel}-{v}"


_SUITE = {}


def suite(config) -> Suite:
    if "s" not in _SUITE:
        _SUITE["s"] = Suite(config)
    return _SUITE["s"]


def pytest_generate_tests(metafunc):
    if "kernel_case" in metafunc.fixturenames:
        s = suite(metafunc.config)
        cases = list(s.cases())
        metafunc.parametrize("kernel_case", [c for c, _ in cases], ids=[i for _, i in cases])


@pytest.fixture(scope="session")
def gpt2k_suite(request):
    return suite(request.config)
