"""The one place that turns a device string into a device and finds the local GPU's architecture.

Device strings are ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` too, through :func:`resolve_device`).
Architecture names are ``sm_XY`` for CUDA devices and ``cpu`` for the CPU, the names the
``databases/<arch>/`` directories use.

TVM is imported inside the functions that need it, never at module import: the CLIs import this
module to build their argument parsers, and ``--help`` must not pay TVM's start-up time.
"""

from __future__ import annotations

import re

__all__ = [
    "DeviceError",
    "arch_for_device",
    "cuda_device_exists",
    "detect_cuda_arch",
    "parse_device",
    "resolve_device",
    "tvm_device",
]

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class DeviceError(ValueError):
    """A malformed device string, or a device that this machine does not have."""


def parse_device(device: str) -> tuple[str, int]:
    """Split a device string into its kind and index.

    Parameters
    ----------
    device : str
        ``cpu``, ``cuda`` or ``cuda:N`` (case and surrounding spaces ignored).

    Returns
    -------
    tuple of (str, int)
        ``("cpu", 0)``, ``("cuda", N)``.

    Raises
    ------
    DeviceError
        Anything else (``auto`` included: see :func:`resolve_device`).
    """
    m = _DEVICE_RE.match(str(device).strip().lower())
    if not m:
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    return m.group(1), int(m.group(2) or 0)


def cuda_device_exists(index: int = 0) -> bool:
    """True when TVM sees CUDA device ``index`` (False without a driver or a CUDA-enabled TVM)."""
    try:
        import tvm  # pylint: disable=import-outside-toplevel  # lazy: keeps CLI start-up fast

        return bool(tvm.cuda(index).exist)
    except Exception:  # pylint: disable=broad-except  # TVM without CUDA, no driver, ...
        return False


def resolve_device(device: str = "auto") -> tuple[str, int]:
    """Like :func:`parse_device`, plus ``auto`` and a check that a CUDA device exists.

    Parameters
    ----------
    device : str
        ``auto`` (CUDA device 0 when TVM sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    tuple of (str, int)

    Raises
    ------
    DeviceError
        Malformed string, or a CUDA device that does not exist here.
    """
    if str(device).strip().lower() == "auto":
        return ("cuda", 0) if cuda_device_exists(0) else ("cpu", 0)
    kind, index = parse_device(device)
    if kind == "cuda" and not cuda_device_exists(index):
        raise DeviceError(
            f"no CUDA device {index} visible here (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it): "
            "use --device cpu"
        )
    return kind, index


def tvm_device(device: str):
    """The ``tvm.runtime.Device`` of a device string; :class:`DeviceError` if it does not exist."""
    import tvm  # pylint: disable=import-outside-toplevel  # lazy: keeps CLI start-up fast

    kind, index = parse_device(device)
    if kind == "cpu":
        return tvm.cpu(index)
    dev = tvm.cuda(index)
    if not dev.exist:
        raise DeviceError(f"no CUDA device {index} on this machine")
    return dev


def detect_cuda_arch(device_index: int = 0) -> str | None:
    """Compute capability of local CUDA device ``device_index`` as ``sm_XY``; None without one.

    NVML (``nvidia-ml-py``) is asked first (no CUDA context is created), then TVM's CUDA runtime.
    """
    try:
        import pynvml  # pylint: disable=import-outside-toplevel  # optional dependency

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() > device_index:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                return f"sm_{major}{minor}"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pylint: disable=broad-except  # no driver / no library: ask TVM
        pass
    try:
        import tvm  # pylint: disable=import-outside-toplevel  # lazy: keeps CLI start-up fast

        dev = tvm.cuda(device_index)
        if dev.exist:
            return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # pylint: disable=broad-except  # TVM without CUDA
        pass
    return None


def arch_for_device(device: str, arch: str | None = None) -> str:
    """The architecture name a build for ``device`` uses: ``cpu``, ``arch`` if given, else detected.

    Raises
    ------
    DeviceError
        A CUDA device whose architecture cannot be detected and no ``arch`` given: the message
        names the ``--arch`` flag to pass.
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        return "cpu"
    if arch:
        return str(arch)
    found = detect_cuda_arch(index)
    if found is None:
        raise DeviceError(
            f"cannot detect the CUDA architecture of {device} here (no GPU visible): "
            "pass --arch sm_XX (e.g. --arch sm_90 for an H100/H200)"
        )
    return found
