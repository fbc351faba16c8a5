"""Benchmark environment: device detection, NVML snapshot, card peak figures.

Everything here only *reads* the machine. NVML is used strictly read-only: this module
never sets clocks, power limits, persistence mode or anything else (``nvmlDeviceSet*`` is
never called).

Public API
----------
``resolve_device(spec)`` / ``arch_of(device, arch)``
    ``--device`` / ``--arch`` through ``gpt2_model.device`` (the project's one resolver).
``collect_env(device, *, arch, database=None)``
    A JSON-ready dict recorded in every benchmark result (see ``bench/SCHEMA.md``).
``peak_for(gpu_name, *, dtype)``
    :class:`Peak` (memory GB/s, TFLOP/s for the dtype) from :data:`PEAK_TABLE`, or ``None``.
``resolve_peak(env, *, dtype, peak_bw=None, peak_tflops=None)``
    The peak used for roofline percentages, honouring ``--peak-bw/--peak-tflops`` overrides.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any

from gpt2_model.cuda_graph import STEP_MARK_ENV

__all__ = [
    "DeviceSpec",
    "Peak",
    "PEAK_TABLE",
    "resolve_device",
    "arch_of",
    "collect_env",
    "nvml_snapshot",
    "cpu_model",
    "peak_for",
    "resolve_peak",
]


# ---------------------------------------------------------------------------------------------
# Card peak figures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peak:
    """Peak figures of one card, used as the roofline for percentages.

    Attributes
    ----------
    name : str
        Human name of the table entry (or ``"override"``).
    mem_gb_s : float or None
        Peak DRAM/HBM bandwidth in GB/s (10^9 bytes per second).
    tflops : float or None
        Peak dense TFLOP/s for the compute dtype in question.
    source : str
        Where the figure comes from.
    """

    name: str
    mem_gb_s: float | None
    tflops: float | None
    source: str


# Source: NVIDIA product datasheets (public spec sheets of each card, "dense" i.e. without
# 2:4 structured sparsity; the sheets list sparse numbers as 2x these). fp16 = FP16/BF16 Tensor
# Core throughput with FP32 accumulate; fp32 = plain (non-tensor-core) FP32. Boost clocks, so
# sustained figures are a few percent lower, and a throttled card lower still (the NVML snapshot
# records clocks and throttle reasons next to every result).
# Matching is by substring of the NVML/CUDA device name, case-insensitive, first match wins,
# so more specific names come first ("GH200" before "H200", which it contains).
#   (substring,          display name,          GB/s,  fp16 TFLOP/s, fp32 TFLOP/s)
PEAK_TABLE: list[tuple[str, str, float, float, float]] = [
    ("GH200", "GH200 (H100 96GB)", 4000.0, 989.4, 66.9),
    ("H200 NVL", "H200 NVL", 4800.0, 835.0, 60.0),
    ("H200", "H200 SXM 141GB", 4800.0, 989.4, 66.9),
    ("H100 NVL", "H100 NVL 94GB", 3900.0, 835.0, 60.0),
    ("H100 PCIe", "H100 PCIe 80GB", 2000.0, 756.0, 51.2),
    ("H100 80GB HBM3", "H100 SXM5 80GB", 3350.0, 989.4, 66.9),
    ("H100", "H100 SXM5 80GB (assumed SXM)", 3350.0, 989.4, 66.9),
    ("B200", "B200", 8000.0, 2250.0, 80.0),
    ("A100-SXM4-80GB", "A100 SXM4 80GB", 2039.0, 312.0, 19.5),
    ("A100 80GB PCIe", "A100 PCIe 80GB", 1935.0, 312.0, 19.5),
    ("A100-SXM4-40GB", "A100 SXM4 40GB", 1555.0, 312.0, 19.5),
    ("A100-PCIE-40GB", "A100 PCIe 40GB", 1555.0, 312.0, 19.5),
    ("A100", "A100 (assumed 80GB SXM4)", 2039.0, 312.0, 19.5),
    ("L40S", "L40S", 864.0, 362.0, 91.6),
    ("L40", "L40", 864.0, 181.0, 90.5),
    ("L4", "L4", 300.0, 121.0, 30.3),
    ("A10G", "A10G", 600.0, 70.0, 31.2),
    ("A10", "A10", 600.0, 125.0, 31.2),
    ("RTX 4090", "GeForce RTX 4090", 1008.0, 165.2, 82.6),
    ("V100", "V100", 900.0, 125.0, 15.7),
    ("T4", "T4", 320.0, 65.0, 8.1),
]

_PEAK_SOURCE = "NVIDIA datasheet (dense, boost clock); see bench/env.py PEAK_TABLE"


def peak_for(gpu_name: str | None, *, dtype: str = "float16") -> Peak | None:
    """Look up a card's peak bandwidth and TFLOP/s.

    Parameters
    ----------
    gpu_name : str or None
        Device name as reported by NVML, CUDA or torch (e.g. ``"NVIDIA H100 80GB HBM3"``).
    dtype : str
        Compute dtype; ``float16``/``bfloat16`` select the tensor-core figure, ``float32`` the
        plain FP32 figure.

    Returns
    -------
    Peak or None
        ``None`` when the name is unknown (CPUs, unlisted cards): percentages are then omitted.
    """
    if not gpu_name:
        return None
    low = gpu_name.lower()
    for sub, display, bw, f16, f32 in PEAK_TABLE:
        if sub.lower() in low:
            tflops = f32 if dtype in ("float32", "f32") else f16
            return Peak(name=display, mem_gb_s=bw, tflops=tflops, source=_PEAK_SOURCE)
    return None


def resolve_peak(
    env: dict[str, Any],
    *,
    dtype: str,
    peak_bw: float | None = None,
    peak_tflops: float | None = None,
) -> Peak | None:
    """The roofline used for percentages: the table entry for the GPU, with overrides.

    Parameters
    ----------
    env : dict
        Result of :func:`collect_env`.
    dtype : str
        Compute dtype of the model (``float16`` or ``float32``).
    peak_bw, peak_tflops : float, optional
        ``--peak-bw`` (GB/s) and ``--peak-tflops`` overrides; they win over the table and are
        the only way to get percentages on a CPU.

    Returns
    -------
    Peak or None
    """
    base = peak_for((env.get("gpu") or {}).get("name"), dtype=dtype)
    if peak_bw is None and peak_tflops is None:
        return base
    if peak_bw is not None and peak_bw <= 0 or peak_tflops is not None and peak_tflops <= 0:
        raise ValueError("--peak-bw and --peak-tflops must be positive numbers")
    return Peak(
        name=(base.name + " (overridden)") if base else "override",
        mem_gb_s=peak_bw if peak_bw is not None else (base.mem_gb_s if base else None),
        tflops=peak_tflops if peak_tflops is not None else (base.tflops if base else None),
        source="command line override" + (f"; rest from {base.source}" if base else ""),
    )


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    """A resolved benchmark device.

    Attributes
    ----------
    kind : str
        ``"cpu"`` or ``"cuda"``.
    index : int
        Device ordinal (0 for CPU).
    """

    kind: str
    index: int = 0

    @property
    def name(self) -> str:
        """``"cpu"`` or ``"cuda:N"`` (the string the Engine and torch accept)."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def tvm_device(self):
        """The matching ``tvm.runtime.Device`` (:func:`gpt2_model.device.tvm_device`)."""
        from gpt2_model.device import tvm_device

        return tvm_device(self.name)


def resolve_device(spec: str = "auto") -> DeviceSpec:
    """``--device`` as a :class:`DeviceSpec`, through the project's one device resolver
    (:func:`gpt2_model.device.resolve_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises
    ------
    gpt2_model.device.DeviceError
        Malformed spec, or a CUDA device that does not exist (a ``ValueError``).
    """
    from gpt2_model.device import resolve_device as _resolve

    kind, index = _resolve(spec)
    return DeviceSpec(kind, index)


def arch_of(device: DeviceSpec, arch: str | None = None) -> str:
    """Architecture name of the build and the database lookup: ``cpu`` on the CPU, ``arch`` when
    given, else the GPU's detected ``sm_XX`` (:func:`gpt2_model.device.arch_for_device`)."""
    from gpt2_model.device import arch_for_device

    return arch_for_device(device.name, arch)


def cpu_model() -> str:
    """CPU model name (the same detection as the tuning databases use)."""
    from tuning.targets import detect_cpu

    return detect_cpu()["name"]


# ---------------------------------------------------------------------------------------------
# NVML (read only)
# ---------------------------------------------------------------------------------------------
_THROTTLE_BITS = [
    ("GpuIdle", 0x1),
    ("ApplicationsClocksSetting", 0x2),
    ("SwPowerCap", 0x4),
    ("HwSlowdown", 0x8),
    ("SyncBoost", 0x10),
    ("SwThermalSlowdown", 0x20),
    ("HwThermalSlowdown", 0x40),
    ("HwPowerBrakeSlowdown", 0x80),
    ("DisplayClockSetting", 0x100),
]


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the NVML clock-event ("throttle") reason bits set in ``mask``."""
    names = [name for name, bit in _THROTTLE_BITS if mask & bit]
    known = 0
    for _, bit in _THROTTLE_BITS:
        known |= bit
    if mask & ~known:
        names.append(f"other(0x{mask & ~known:x})")
    return names


def _nvml_index(index: int) -> tuple[str, Any]:
    """How to find CUDA device ``index`` in NVML: by UUID via torch, else CUDA_VISIBLE_DEVICES."""
    try:
        import torch

        if torch.cuda.is_available():
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            if uuid:
                return "uuid", uuid if uuid.startswith("GPU-") else "GPU-" + uuid
    except Exception:
        pass
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis:
        items = [v.strip() for v in vis.split(",") if v.strip()]
        if index < len(items):
            item = items[index]
            if item.isdigit():
                return "index", int(item)
            return "uuid", item
    return "index", index


def nvml_snapshot(index: int = 0) -> dict[str, Any]:
    """Read-only NVML snapshot of one GPU.

    Parameters
    ----------
    index : int
        CUDA device ordinal (mapped to the NVML device by UUID or ``CUDA_VISIBLE_DEVICES``).

    Returns
    -------
    dict
        ``name, uuid, driver, cuda_driver_version, sm_clock_mhz, mem_clock_mhz,
        max_sm_clock_mhz, max_mem_clock_mhz, temperature_c, power_w, power_limit_w,
        memory_total_mib, compute_capability, throttle_reasons (list), throttle_mask``;
        fields NVML cannot read are ``None``; ``{"error": "..."}`` when NVML is unavailable.
    """
    try:
        import pynvml as nv
    except ImportError:
        return {"error": "nvidia-ml-py (pynvml) not installed"}
    try:
        nv.nvmlInit()
    except Exception as e:  # no driver
        return {"error": f"NVML init failed: {e}"}
    out: dict[str, Any] = {}
    try:
        how, key = _nvml_index(index)
        try:
            h = nv.nvmlDeviceGetHandleByUUID(key) if how == "uuid" else nv.nvmlDeviceGetHandleByIndex(key)
        except Exception:
            h = nv.nvmlDeviceGetHandleByIndex(index)

        def _get(fn, *a, scale=None):
            try:
                v = fn(*a)
            except Exception:
                return None
            if isinstance(v, bytes):
                v = v.decode()
            if scale is not None and v is not None:
                v = v * scale
            return v

        out["name"] = _get(nv.nvmlDeviceGetName, h)
        out["uuid"] = _get(nv.nvmlDeviceGetUUID, h)
        out["driver"] = _get(nv.nvmlSystemGetDriverVersion)
        out["cuda_driver_version"] = _get(nv.nvmlSystemGetCudaDriverVersion)
        out["sm_clock_mhz"] = _get(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
        out["mem_clock_mhz"] = _get(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM)
        out["max_sm_clock_mhz"] = _get(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM)
        out["max_mem_clock_mhz"] = _get(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_MEM)
        out["temperature_c"] = _get(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
        out["power_w"] = _get(nv.nvmlDeviceGetPowerUsage, h, scale=1e-3)
        out["power_limit_w"] = _get(nv.nvmlDeviceGetEnforcedPowerLimit, h, scale=1e-3)
        mem = _get(nv.nvmlDeviceGetMemoryInfo, h)
        out["memory_total_mib"] = int(mem.total // (1 << 20)) if mem is not None else None
        cc = _get(nv.nvmlDeviceGetCudaComputeCapability, h)
        out["compute_capability"] = f"{cc[0]}.{cc[1]}" if cc else None
        fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons"
        )
        mask = _get(fn, h)
        out["throttle_mask"] = mask
        out["throttle_reasons"] = decode_throttle_reasons(int(mask)) if mask is not None else None
    except Exception as e:
        out["error"] = f"NVML query failed: {e}"
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Environment record
# ---------------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for mod in ("tvm", "numpy", "torch", "transformers"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:
            out[mod] = None
    try:
        import tvm

        info = tvm.support.libinfo()
        out["tvm_git_commit"] = str(info.get("GIT_COMMIT_HASH", "")) or None
        out["tvm_cuda_version"] = str(info.get("CUDA_VERSION", "")) or None
    except Exception:
        pass
    return out


def collect_env(device: DeviceSpec, *, arch: str | None = None,
                database: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything recorded about where and with what a result was measured.

    Parameters
    ----------
    device : DeviceSpec
        The benchmark device.
    arch : str, optional
        The architecture the build targets (default: :func:`arch_of` the device).
    database : dict, optional
        ``{"path": ..., "hash": ..., ...}`` of the tuning database used by the tuned variant
        (``None`` when there is none).

    Returns
    -------
    dict
        ``date`` (ISO 8601, UTC), ``host``, ``platform``, ``device`` (``cpu``/``cuda:N``),
        ``arch``, ``cpu`` (model, logical cores), ``gpu`` (NVML snapshot, CUDA only, else
        ``None``), ``versions`` (python, tvm, numpy, torch, transformers), ``database``,
        ``settings`` (the ``GPT2K_*`` settings in effect that change how the engine runs, defaults
        included, e.g. ``GPT2K_STEP_MARK``: a figure is labelled by them).
    """
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device.name,
        "arch": None,
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count()},
        "gpu": None,
        "versions": _versions(),
        "database": database,
        "settings": {k: os.environ.get(k, default) for k, default in sorted(ENGINE_SETTINGS.items())},
    }
    try:
        env["arch"] = arch or arch_of(device)
    except Exception as e:
        env["arch"] = None
        env["arch_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    if device.kind == "cuda":
        gpu = nvml_snapshot(device.index)
        if not gpu.get("name"):
            try:  # fall back to TVM's device name when NVML is unavailable
                import tvm

                gpu["name"] = tvm.cuda(device.index).device_name
            except Exception:
                pass
        env["gpu"] = gpu
    return env


#: Environment variables that change how the engine runs a step, with their defaults (the value in
#: effect is recorded with every bench run).
ENGINE_SETTINGS = {STEP_MARK_ENV: "1"}


def peak_to_dict(peak: Peak | None) -> dict[str, Any] | None:
    """JSON form of a :class:`Peak` (``None`` stays ``None``)."""
    return asdict(peak) if peak is not None else None
