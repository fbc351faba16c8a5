"""Architecture name → ``tvm.target.Target``, plus this host's CPU description.

The local GPU's arch is detected by ``gpt2_model.device.detect_cuda_arch`` (one resolver).

One table (:data:`ARCH_LIMITS`) holds the per-architecture limits that MetaSchedule and dlight
read from a CUDA target. The targets are built from JSON dicts; TVM in this version rejects
CLI-style target strings, and the ``nvidia/nvidia-h100`` tag resolves to ``sm_90a`` (dlight then
skips its tensor-core rules), so we spell ``sm_90`` ourselves.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass

import psutil
from tvm.target import Target, codegen

__all__ = [
    "ARCH_LIMITS",
    "KNOWN_ARCHS",
    "ArchLimits",
    "UnknownArchError",
    "arch_of",
    "detect_cpu",
    "is_gpu",
    "make_target",
    "sanitize",
]

KNOWN_ARCHS = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "cpu")

_KB = 1024
_MB = 1024 * 1024


@dataclass(frozen=True)
class ArchLimits:
    """Per-architecture hardware limits of one representative part.

    ``max_shared_memory_per_block`` is what goes into the target: the 48 KiB a kernel may use
    through *static* ``__shared__`` allocations, which is what TVM's CUDA codegen emits for the
    ``shared`` scope (and what ``cudaDevAttrMaxSharedMemoryPerBlock`` reports, so a target
    detected from a live device carries the same figure). The larger opt-in limit (dynamic shared
    memory after ``cudaFuncSetAttribute``) is kept in ``shared_memory_optin_per_block`` for
    reference; advertising it would let MetaSchedule sample static allocations that ptxas rejects.
    """

    parts: str
    max_shared_memory_per_block: int
    shared_memory_optin_per_block: int
    max_threads_per_block: int
    registers_per_block: int
    thread_warp_size: int
    l2_cache_size_bytes: int


# Source: NVIDIA CUDA C++ Programming Guide, "Compute Capabilities" table (threads/block 1024,
# warp 32, 64 K 32-bit registers per block for CC 7.0-12.0, 48 KiB static shared memory per block,
# opt-in maxima 96/64/163/99/99/227/227/99 KiB), and the architecture whitepapers / product
# datasheets for L2 size: V100 6 MB, T4 4 MB, A100 40 MB, A10 and RTX 3090 6 MB, L4 48 MB
# (RTX 4090: 72 MB), H100 SXM5/PCIe 50 MB, B200 126 MB (two dies), RTX 5090 96 MB.
# The L2 figure is the listed part's; other parts of the same arch differ (noted in `parts`).
ARCH_LIMITS: dict[str, ArchLimits] = {
    "sm_70": ArchLimits("V100", 48 * _KB, 96 * _KB, 1024, 65536, 32, 6 * _MB),
    "sm_75": ArchLimits("T4 / RTX 20", 48 * _KB, 64 * _KB, 1024, 65536, 32, 4 * _MB),
    "sm_80": ArchLimits("A100", 48 * _KB, 163 * _KB, 1024, 65536, 32, 40 * _MB),
    "sm_86": ArchLimits("A10 / RTX 30", 48 * _KB, 99 * _KB, 1024, 65536, 32, 6 * _MB),
    "sm_89": ArchLimits("L4 (RTX 4090: 72 MB L2)", 48 * _KB, 99 * _KB, 1024, 65536, 32, 48 * _MB),
    "sm_90": ArchLimits("H100 / H200", 48 * _KB, 227 * _KB, 1024, 65536, 32, 50 * _MB),
    "sm_100": ArchLimits("B200", 48 * _KB, 227 * _KB, 1024, 65536, 32, 126 * _MB),
    "sm_120": ArchLimits("RTX 50 (RTX 5090)", 48 * _KB, 99 * _KB, 1024, 65536, 32, 96 * _MB),
}


class UnknownArchError(ValueError):
    """Raised for an architecture name that is not in :data:`KNOWN_ARCHS`."""

    def __init__(self, arch: str):
        self.arch = arch
        super().__init__(f"unknown arch {arch!r}; known archs: {', '.join(KNOWN_ARCHS)}")


def _cpu_target_dict() -> dict:
    cfg = {"kind": "llvm"}
    mcpu = codegen.llvm_get_system_cpu()
    if mcpu and mcpu != "generic":
        cfg["mcpu"] = mcpu
    return cfg


# The host side of a CUDA module is only launch glue. It stays generic (no `mcpu`) so a module
# cross-built here for an RPC-attached GPU box runs on that box's CPU whatever its ISA level.
_CUDA_HOST = {"kind": "llvm"}


def make_target(arch: str, *, num_cores: int | None = None) -> Target:
    """Build the TVM target of an architecture name.

    Parameters
    ----------
    arch : str
        One of :data:`KNOWN_ARCHS`: ``sm_XX`` for a CUDA GPU, ``cpu`` for this host's CPU.
    num_cores : int, optional
        For ``cpu`` only: the ``num-cores`` attribute (threads the generated code may use).
        Defaults to the detected core count.

    Returns
    -------
    tvm.target.Target
        A ``cuda`` target carrying the arch's limits with a generic ``llvm`` host, or an
        ``llvm`` target with the detected ``mcpu`` and ``num-cores``.

    Raises
    ------
    UnknownArchError
        If ``arch`` is not a known architecture.
    """
    if arch not in KNOWN_ARCHS:
        raise UnknownArchError(arch)
    if arch == "cpu":
        cfg = _cpu_target_dict()
        cfg["num-cores"] = int(num_cores or detect_cpu()["cores"])
        return Target(cfg)
    lim = ARCH_LIMITS[arch]
    cfg = {
        "kind": "cuda",
        "arch": arch,
        "max_shared_memory_per_block": lim.max_shared_memory_per_block,
        "max_threads_per_block": lim.max_threads_per_block,
        "registers_per_block": lim.registers_per_block,
        "thread_warp_size": lim.thread_warp_size,
        "l2_cache_size_bytes": lim.l2_cache_size_bytes,
    }
    return Target(cfg, host=dict(_CUDA_HOST))


def is_gpu(target: Target) -> bool:
    """True for a GPU target kind (cuda, rocm, metal, vulkan, opencl)."""
    return target.kind.name in ("cuda", "rocm", "metal", "vulkan", "opencl")


def cuda_sm_at_least(target, version: int) -> bool:
    """Whether ``target`` is CUDA with an ``sm_XY`` arch of at least ``version`` (90: Hopper; ``sm_90a``
    counts as 90). None or another kind: False."""
    if target is None or target.kind.name != "cuda":
        return False
    arch = str(target.attrs.get("arch", ""))
    digits = "".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit())
    return bool(digits) and int(digits) >= version


def arch_of(target: Target | dict) -> str:
    """Architecture name of a target: its ``arch`` (e.g. ``sm_90``) for CUDA, ``cpu`` for LLVM.

    Parameters
    ----------
    target : tvm.target.Target or dict
        A target, or its exported JSON dict (as stored in ``meta.json``).

    Returns
    -------
    str
    """
    if isinstance(target, dict):
        kind, arch = target.get("kind"), target.get("arch")
    else:
        kind, arch = target.kind.name, target.attrs.get("arch")
    if kind == "llvm":
        return "cpu"
    if kind == "cuda":
        if not arch:
            raise ValueError("cuda target without an 'arch' attribute")
        return str(arch)
    raise ValueError(f"unsupported target kind {kind!r} (expected 'cuda' or 'llvm')")


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine() or "unknown"


def detect_cpu() -> dict:
    """Describe this host's CPU.

    Returns
    -------
    dict
        ``name`` (model name, e.g. ``"AMD EPYC 9654"``), ``mcpu`` (LLVM's name for the host CPU,
        e.g. ``"znver4"``), ``cores`` (physical cores usable by this process; logical if unknown).
    """
    cores = None
    try:
        cores = psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to tell
        cores = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = min(cores or usable or 1, usable or 1)
    return {"name": _cpu_model_name(), "mcpu": codegen.llvm_get_system_cpu(), "cores": int(cores)}


def sanitize(name: str) -> str:
    """Lower-case ``name``, keeping ``[a-z0-9.]`` runs joined by ``-`` (for directory names)."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "unknown"
