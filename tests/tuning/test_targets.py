"""tuning.targets: arch names → targets with the arch's limits, CPU detection."""

from __future__ import annotations

import re

import pytest
import tvm

from gpt2_model.device import detect_cuda_arch
from tuning.targets import (
    ARCH_LIMITS,
    KNOWN_ARCHS,
    UnknownArchError,
    arch_of,
    detect_cpu,
    make_target,
)

GPU_ARCHS = [a for a in KNOWN_ARCHS if a != "cpu"]


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


def _tvm_cuda_tags() -> dict[str, tvm.target.Target]:
    """TVM's own target tags for NVIDIA parts (an independent source of the per-block limits)."""
    out = {}
    for name in tvm.target.list_tags():
        if not str(name).startswith("nvidia/"):
            continue
        try:
            out[str(name)] = tvm.target.Target(str(name))
        except Exception:  # pylint: disable=broad-except  # a tag this build cannot make
            continue
    return out


def test_limits_table_agrees_with_tvm_target_tags():
    """Every NVIDIA tag TVM ships for one of our archs has our table's per-block limits; the L2 size
    of a tag for the part our table names (A100 for sm_80, H100 for sm_90) is our figure."""
    tags = _tvm_cuda_tags()
    checked = set()
    for name, tag in tags.items():
        arch = str(tag.attrs.get("arch", "")).rstrip("a")
        if arch not in ARCH_LIMITS:
            continue
        lim = ARCH_LIMITS[arch]
        for field in ("max_shared_memory_per_block", "max_threads_per_block", "registers_per_block",
                      "thread_warp_size"):
            if tag.attrs.get(field) is not None:
                assert int(tag.attrs[field]) == getattr(lim, field), (name, field)
        checked.add(arch)
    assert {"sm_80", "sm_86", "sm_89", "sm_90"} <= checked  # the table was really compared
    for name, arch in (("nvidia/nvidia-a100", "sm_80"), ("nvidia/nvidia-h100", "sm_90")):
        assert int(tags[name].attrs["l2_cache_size_bytes"]) == ARCH_LIMITS[arch].l2_cache_size_bytes
        assert tags[name].attrs["l2_cache_size_bytes"] is not None
    # the opt-in limit is what a kernel may ask for beyond the static one, never less
    for lim in ARCH_LIMITS.values():
        assert lim.shared_memory_optin_per_block >= lim.max_shared_memory_per_block


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
    arch = detect_cuda_arch()
    assert arch is None or re.fullmatch(r"sm_\d+", arch)
    if tvm.cuda(0).exist:  # a GPU TVM can use must be detected
        assert arch == "sm_" + tvm.cuda(0).compute_version.replace(".", "")
