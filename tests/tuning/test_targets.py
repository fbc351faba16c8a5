"""tuning.targets: arch names → targets with the arch's limits, CPU detection."""

from __future__ import annotations

import re

import pytest
import tvm

from tuning.targets import (
    ARCH_LIMITS,
    KNOWN_ARCHS,
    UnknownArchError,
    arch_of,
    detect_cpu,
    detect_local_cuda_arch,
    make_target,
)

GPU_ARCHS = [a for a in KNOWN_ARCHS if a != "cpu"]
MiB = 1024 * 1024


@pytest.mark.parametrize("arch", GPU_ARCHS)
def test_gpu_target_carries_arch_limits(arch):
    target = make_target(arch)
    lim = ARCH_LIMITS[arch]
    assert target.kind.name == "cuda"
    assert str(target.attrs["arch"]) == arch
    assert int(target.attrs["max_shared_memory_per_block"]) == lim.max_shared_memory_per_block
    assert int(target.attrs["max_threads_per_block"]) == lim.max_threads_per_block
    assert int(target.attrs["registers_per_block"]) == lim.registers_per_block
    assert int(target.attrs["thread_warp_size"]) == lim.thread_warp_size
    assert int(target.attrs["l2_cache_size_bytes"]) == lim.l2_cache_size_bytes
    assert target.host is not None and target.host.kind.name == "llvm"
    # a generic host: a module cross-built here must run on the GPU box's CPU
    assert "mcpu" not in target.host.attrs
    assert arch_of(target) == arch
    # the stored JSON form rebuilds the same target
    assert str(tvm.target.Target(str(target))) == str(target)


def test_limits_table_matches_nvidia_figures():
    # Datasheet L2 sizes of the representative parts, and the CUDA guide's per-block limits.
    l2 = {a: ARCH_LIMITS[a].l2_cache_size_bytes // MiB for a in GPU_ARCHS}
    assert l2 == {"sm_70": 6, "sm_75": 4, "sm_80": 40, "sm_86": 6, "sm_89": 48, "sm_90": 50,
                  "sm_100": 126, "sm_120": 96}
    optin_kib = {a: ARCH_LIMITS[a].shared_memory_optin_per_block // 1024 for a in GPU_ARCHS}
    assert optin_kib == {"sm_70": 96, "sm_75": 64, "sm_80": 163, "sm_86": 99, "sm_89": 99,
                         "sm_90": 227, "sm_100": 227, "sm_120": 99}
    for a in GPU_ARCHS:
        assert ARCH_LIMITS[a].max_shared_memory_per_block == 48 * 1024
        assert ARCH_LIMITS[a].registers_per_block == 65536


def test_cpu_target_has_detected_mcpu():
    from tvm.target import codegen

    target = make_target("cpu")
    assert target.kind.name == "llvm"
    assert str(target.attrs["mcpu"]) == codegen.llvm_get_system_cpu()
    assert int(target.attrs["num-cores"]) == detect_cpu()["cores"]
    assert int(make_target("cpu", num_cores=3).attrs["num-cores"]) == 3
    assert arch_of(target) == "cpu"


def test_unknown_arch_lists_known_ones():
    with pytest.raises(UnknownArchError) as info:
        make_target("sm_99")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "sm_99" in msg
    for arch in KNOWN_ARCHS:
        assert arch in msg


def test_arch_of_json_dict_and_bad_kind():
    assert arch_of({"kind": "cuda", "arch": "sm_86"}) == "sm_86"
    assert arch_of({"kind": "llvm", "mcpu": "znver4"}) == "cpu"
    with pytest.raises(ValueError, match="opencl"):
        arch_of({"kind": "opencl"})


def test_detect_cpu_and_local_gpu():
    info = detect_cpu()
    assert set(info) == {"name", "mcpu", "cores"}
    assert isinstance(info["name"], str) and info["name"]
    assert info["cores"] >= 1
    arch = detect_local_cuda_arch()
    assert arch is None or re.fullmatch(r"sm_\d+", arch)
    if tvm.cuda(0).exist:  # a GPU TVM can use must be detected
        assert arch == "sm_" + tvm.cuda(0).compute_version.replace(".", "")
