"""Building the prefill attention search's candidates (:mod:`tuning.attention`).

The s_tir kernels (TVM's SIMT template, the wmma / mma.sync template) go through MetaSchedule's
parallel builder. The wgmma template (:mod:`tuning.attention_fa`) is a TIRx PrimFunc, which the
builder's default pipeline does not lower: those are built here in-process with the tirx pipeline
(:func:`gpt2_model.wgmma_build.build`, compiled for sm_90a through the compile hook) and exported
to a library file, so that every candidate comes back as a path the search loads the same way.
"""

from __future__ import annotations

import os
import tempfile

from gpt2_model.wgmma_build import build as build_tirx
from gpt2_model.wgmma_build import install_compile_hook
from gpt2_model.wgmma_gemm import KERNEL_ATTR

__all__ = ["build_all", "is_tirx_kernel"]


def is_tirx_kernel(func) -> bool:
    """Whether ``func`` is a TIRx kernel (carries :data:`gpt2_model.wgmma_gemm.KERNEL_ATTR`)."""
    return func.attrs is not None and KERNEL_ATTR in func.attrs


def build_all(funcs: list, target, *, workers: int | None) -> tuple[list, list]:
    """Build every kernel; returns (artifact paths, None where a build failed; error messages)."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    out: list = [None] * len(funcs)
    errors: list[str] = []
    plain = [i for i, f in enumerate(funcs) if not is_tirx_kernel(f)]
    if plain:
        builder = ms.builder.LocalBuilder(max_workers=workers or os.cpu_count() or 1, timeout_sec=120)
        inputs = [ms.builder.BuilderInput(tvm.IRModule({"main": funcs[i].with_attr("global_symbol", "main")}), target)
                  for i in plain]
        for i, res in zip(plain, builder.build(inputs)):
            if res.error_msg:
                errors.append(res.error_msg)
            else:
                out[i] = res.artifact_path
    tirx = [i for i, f in enumerate(funcs) if is_tirx_kernel(f)]
    if tirx:
        install_compile_hook()
        tmp = tempfile.mkdtemp(prefix="attn_tirx_")
        for i in tirx:
            try:
                path = os.path.join(tmp, f"kernel_{i}.so")
                build_tirx(funcs[i], target).export_library(path)
                out[i] = path
            except Exception as err:  # noqa: BLE001 - a candidate that fails to build is reported, not fatal
                errors.append(f"{type(err).__name__}: {err}")
    return out, errors
