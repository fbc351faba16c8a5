"""Compile an exported model: prepare -> (tuned records) -> dlight -> lowering -> library."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import tvm
from tvm import IRModule, relax
from tvm.target import Target

from .pipeline import lowering_passes, prepare

logger = logging.getLogger(__name__)


def is_gpu(target: Target) -> bool:
    return target.kind.name in ("cuda", "rocm", "metal", "vulkan", "opencl")


def dlight_rules(target: Target) -> list:
    """The untuned schedule rules, in MLC-LLM's order (LowBatchGEMV included, as MLC does)."""
    from tvm.s_tir import dlight as dl  # pylint: disable=import-outside-toplevel

    del target
    return [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.LowBatchGEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]


def apply_dlight(mod: IRModule, *, target: Target) -> IRModule:
    """Schedule every still-unscheduled kernel with dlight (GPU targets only)."""
    from tvm.s_tir import dlight as dl  # pylint: disable=import-outside-toplevel

    if not is_gpu(target):
        return mod
    with target:
        return dl.ApplyDefaultSchedule(*dlight_rules(target))(mod)


def build_module(
    mod: IRModule,
    *,
    target: Target,
    cuda_graph: bool = False,
    scheduled: IRModule | None = None,
) -> tvm.runtime.Executable:
    """Lower a scheduled module (or prepare + dlight ``mod`` when ``scheduled`` is None)."""
    if scheduled is None:
        scheduled = apply_dlight(prepare(mod, target=target), target=target)
    config = {"relax.backend.use_cuda_graph": bool(cuda_graph and is_gpu(target))}
    with tvm.transform.PassContext(opt_level=3, config=config):
        return relax.build(
            scheduled,
            target=target,
            relax_pipeline=tvm.transform.Sequential(lowering_passes(target)),
        )


def build(exported, *, target: Target, database=None, cuda_graph: bool = False) -> tvm.runtime.Executable:
    """Build the library of an :class:`~gpt2_model.export.ExportedModel`.

    Parameters
    ----------
    exported : ExportedModel
        The exported relax module.
    target : Target
        The build target (``tuning.targets.make_target``).
    database : path-like or None
        A tuned database directory; ``None`` is the untuned build (dlight on GPUs, the default
        LLVM pipeline on CPUs).
    cuda_graph : bool
        Capture static-shape regions into CUDA graphs (GPU targets).
    """
    start = time.time()
    mod = prepare(exported.mod, target=target)
    if database is not None:
        from .apply import apply_tuned  # pylint: disable=import-outside-toplevel

        mod = apply_tuned(mod, database=Path(database), target=target, exported=exported)
    mod = apply_dlight(mod, target=target)
    ex = build_module(mod, target=target, cuda_graph=cuda_graph, scheduled=mod)
    logger.info("built %s for %s in %.1f s", exported.scheme.name, target.kind.name, time.time() - start)
    return ex
