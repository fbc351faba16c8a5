"""CUDA binaries compiled when a library is built, so that loading it compiles nothing.

TVM 0.27 compiles a library's CUDA C++ (one source for all its kernels) when it is built only where
the CUDA runtime is present (``CUDAModuleCreateWithFallback``: the ``tvm_callback_cuda_compile``
callback, at build). A library built on a machine without CUDA (this project's CPU machines, which
prebuild the GPU's libraries) holds the source instead, and the CUDA runtime compiles it, with
NVRTC through that same callback, each time the library is loaded: for the tuned gpt2 library that
was 34 s of every bench process's start-up on an H100 (2026-12-07: ``build.load_parts.module_s``),
against 0.6 s for a library built on the card.

Here the source is compiled once, when the library is exported (:func:`precompile`): nvcc, through
TVM's own ``compile_cuda`` (the options of its NVRTC path: ``--use_fast_math``, TVM's ptxas flags),
for the arch the load would compile for (:func:`load_arch`: the target's arch, ``sm_90a`` for
source holding wgmma or setmaxnreg), into ``<library>.cubin/<sha256 of the source>-<arch>.cubin``.
:func:`load_module` loads a library with its cubins registered; the load callback
(:func:`install_compile_hook`) then returns the cubin whose source hash and
arch match (:func:`find_cubin`) and compiles as before when none does (another GPU, no nvcc at
build time, a library from before this): a cubin is only ever used for exactly the source and arch
it was compiled from. A library built where the CUDA runtime is present already holds its binary:
:func:`precompile` then makes no sidecar.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import tvm

__all__ = ["ARCH_A_MARKERS", "SUFFIX", "cubin_name", "find_cubin", "install_compile_hook", "load_arch", "load_module",
           "precompile", "register", "sidecar_dir", "stats"]

logger = logging.getLogger(__name__)

#: What in generated CUDA needs an arch-specific ("a") target: wgmma and setmaxnreg exist on sm_90a only.
ARCH_A_MARKERS = ("wgmma.", "setmaxnreg.")
#: The sidecar directory of a library: ``lib.so`` -> ``lib.so.cubin/``.
SUFFIX = ".cubin"
_EXT = ".cubin"  # a cubin file in it
_DIRS: list[Path] = []  # sidecar directories of the libraries loaded through load_module
_STATS = {"hits": 0, "misses": 0}
_HOOK = {"installed": False}


def _local_arch() -> str | None:
    dev = tvm.cuda(0)
    return "sm_" + dev.compute_version.replace(".", "") if dev.exist else None


def load_arch(code: str, target_arch: str | None) -> str | None:
    """The arch a load compiles ``code`` for: ``target_arch`` (else the local GPU's), ``sm_90a`` where
    the source needs it (:data:`ARCH_A_MARKERS`); None when neither is known."""
    arch = target_arch or _local_arch()
    if arch and arch.startswith("sm_90") and any(m in code for m in ARCH_A_MARKERS):
        return "sm_90a"
    return arch


def cubin_name(code: str, arch: str) -> str:
    return f"{hashlib.sha256(code.encode()).hexdigest()}-{arch}{_EXT}"


def sidecar_dir(lib: str | Path) -> Path:
    return Path(str(lib) + SUFFIX)


def find_cubin(code: str, arch: str | None) -> bytearray | None:
    """The cubin compiled from exactly ``code`` for ``arch`` in a registered sidecar, else None (counted
    in :func:`stats`)."""
    if arch is not None:
        name = cubin_name(code, arch)
        for d in reversed(_DIRS):
            path = d / name
            if path.is_file():
                _STATS["hits"] += 1
                return bytearray(path.read_bytes())
    _STATS["misses"] += 1
    return None


def stats() -> dict[str, int]:
    """``{"hits": cubins served, "misses": sources compiled at load}`` since the process started."""
    return dict(_STATS)


def _cuda_modules(mod) -> list:
    out, todo = [], [mod]
    while todo:
        m = todo.pop()
        if m.kind == "cuda":
            out.append(m)
        todo.extend(m.imports)
    return out


def _clear(side: Path) -> None:
    if side.is_dir():
        for old in side.glob("*" + _EXT):
            old.unlink()


def _compiled_at_build() -> bool:
    """Whether TVM's codegen compiled the CUDA source itself (``CUDAModuleCreateWithFallback``: the CUDA
    runtime's module factory registered and no ``TVM_COMPILE_FORCE_FALLBACK``)."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    forced = os.environ.get("TVM_COMPILE_FORCE_FALLBACK", "").strip().lower() not in ("", "0", "false", "off")
    return not forced and tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def precompile(executable, lib: str | Path, target) -> dict:
    """Compile the CUDA source of ``executable`` (a relax ``VMExecutable`` or a runtime module) into
    ``lib``'s sidecar; returns what happened (JSON-ready): ``{"cubins": [...], "s": ..., "compiler": "nvcc"}``
    or ``{"skipped": why}``. A failed compile is logged and skipped: the library still works, and its
    load compiles the source as without a sidecar."""
    _clear(sidecar_dir(lib))  # (a library rebuilt at the same path: its old cubins would only be dead weight)
    if target.kind.name != "cuda":
        return {"skipped": f"{target.kind.name} target"}
    if _compiled_at_build():
        return {"skipped": "compiled when built (the CUDA runtime is present): the library holds its binary"}
    if shutil.which("nvcc") is None:
        return {"skipped": "no nvcc on PATH: the GPU compiles the source when the library is loaded"}
    from tvm.support import nvcc  # pylint: disable=import-outside-toplevel

    mod = getattr(executable, "mod", executable)
    target_arch = target.attrs.get("arch")
    target_arch = str(target_arch) if target_arch else None
    out_dir = sidecar_dir(lib)
    done, t0 = [], time.perf_counter()
    for m in _cuda_modules(mod):
        code = m.inspect_source()
        arch = load_arch(code, target_arch)
        if arch is None:
            return {"skipped": "no arch on the target and no local GPU"}
        try:
            with tvm.target.Target({"kind": "cuda", "arch": arch}):  # (TVM's nvcc path reads the current target)
                binary = nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvcc")
        except Exception as err:  # pylint: disable=broad-except
            logger.warning("CUDA source of %s not precompiled (%s): it compiles when the library is loaded",
                           lib, str(err).splitlines()[0] if str(err) else type(err).__name__)
            return {"skipped": f"nvcc failed: {str(err)[:200]}"}
        out_dir.mkdir(parents=True, exist_ok=True)
        name = cubin_name(code, arch)
        (out_dir / name).write_bytes(bytes(binary))
        done.append(name)
    return {"cubins": done, "s": round(time.perf_counter() - t0, 1), "compiler": "nvcc"}


def register(lib: str | Path) -> None:
    """Make ``lib``'s sidecar cubins (if it has any) available to the load callback."""
    side = sidecar_dir(lib)
    if side.is_dir() and side not in _DIRS:
        _DIRS.append(side)


def load_module(lib: str | Path):
    """``tvm.runtime.load_module(lib)`` with ``lib``'s sidecar cubins registered for its CUDA load."""
    install_compile_hook()
    register(lib)
    return tvm.runtime.load_module(str(lib))


def install_compile_hook() -> None:
    """The load callback: a library's precompiled cubins first, and source holding wgmma or setmaxnreg
    (:mod:`gpt2_model.wgmma_gemm`, the flash-attention template) compiled for ``sm_90a`` (idempotent).

    TVM 0.27 compiles a module's CUDA source through the ``tvm_callback_cuda_compile`` callback, at
    build time where the CUDA runtime is present, else when the library is loaded, for the target's
    or the local GPU's arch (``sm_90``). wgmma and setmaxnreg need ``sm_90a``: this wraps the callback so that
    source containing them is compiled for ``sm_90a`` (the same hardware: an sm_90a binary runs on
    H100/H200 only, as an sm_90 one does); every other source goes to TVM's callback unchanged. First,
    though, a cubin that :func:`precompile` made from exactly this source for this arch, in the sidecar
    of a library loaded through :func:`load_module`, is returned as it is: nothing compiles.
    """
    if _HOOK["installed"]:
        return
    import tvm_ffi  # pylint: disable=import-outside-toplevel
    from tvm.support import nvcc  # pylint: disable=import-outside-toplevel

    original = nvcc.tvm_callback_cuda_compile

    def compile_hook(code, *_):
        current = tvm.target.Target.current(allow_none=True)
        arch = load_arch(code, getattr(current, "arch", None) if current is not None else None)
        binary = find_cubin(code, arch)
        if binary is not None:
            return binary
        if arch == "sm_90a" and any(m in code for m in ARCH_A_MARKERS):  # (TVM's own callback would pick sm_90)
            if os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower() == "nvcc":
                return nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc")
            return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")
        return original(code)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_hook, override=True)
    _HOOK["installed"] = True
