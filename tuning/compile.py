"""Compile an exported model: prepare -> (tuned records) -> dlight -> lowering -> library."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import tvm
from tvm import IRModule, relax
from tvm.target import Target

from gpt2_model.export import export_model
from gpt2_model.wgmma_build import has_wgmma_kernels, install_compile_hook, register_mixed_pipeline

from .apply import apply_database, coverage, schedule_like_untuned
from .attention import apply_attention, attention_key
from .builder import build_config
from .database import DatabaseMismatchError, TunedDatabase
from .partition import attach_twins, buckets_for, tasks_of
from .norm_gemv_tune import norm_gemv_plan_for
from .wgmma_tune import gemm_plan_for
from .pdl import pdl_mode, pdl_pipeline
from .pipeline import lowering_passes, prepare
from .targets import arch_of, is_gpu
from .untuned import apply_dlight

__all__ = ["BuildResult", "apply_dlight", "build", "build_model", "build_module", "default_buckets", "is_gpu"]

logger = logging.getLogger(__name__)


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
    config = {"relax.backend.use_cuda_graph": bool(cuda_graph and is_gpu(target)), **build_config(target)}
    # wgmma kernels (gpt2_model.wgmma_gemm) are tirx PrimFuncs: lowered by their own pipeline, compiled for sm_90a
    tir_pipeline = "default"
    if has_wgmma_kernels(scheduled):
        install_compile_hook()
        tir_pipeline = register_mixed_pipeline()
    mode = pdl_mode(target)  # GPT2K_PDL=1 or wait, sm_90+: every kernel with programmatic dependent launch (tuning.pdl)
    if mode is not None:
        tir_pipeline = pdl_pipeline(tir_pipeline, mode)
    with tvm.transform.PassContext(opt_level=3, config=config):
        return relax.build(
            scheduled,
            target=target,
            relax_pipeline=tvm.transform.Sequential(lowering_passes(target)),
            tir_pipeline=tir_pipeline,
        )


def build(exported, *, target: Target, database=None, cuda_graph: bool = False,
          untuned_us: dict[str, float] | None = None) -> tvm.runtime.Executable:
    """Build the library of an :class:`~gpt2_model.export.ExportedModel`.

    Parameters
    ----------
    exported : ExportedModel
        The exported relax module (its bucket entry points come from ``metadata["buckets"]``).
    target : Target
        The build target (``tuning.targets.make_target``).
    database : ms.database.Database or None
        An opened tuned database (``TunedDatabase.open(...).ms``); ``None`` is the untuned
        build: dlight on GPUs, the default LLVM pipeline on CPUs.
    cuda_graph : bool
        Capture static-shape regions into CUDA graphs (GPU targets).
    untuned_us : dict, optional
        Untuned kernel times per task (``untuned.json``): records slower than these are skipped.
    """
    buckets = exported.metadata.get("buckets") or {}
    return _build_prepared(prepare(exported.mod, target=target), target=target, database=database,
                           cuda_graph=cuda_graph, buckets=buckets, untuned_us=untuned_us)[0]


def _build_prepared(mod: IRModule, *, target: Target, database, cuda_graph: bool, buckets,
                    untuned_us=None) -> tuple[tvm.runtime.Executable, set[str], list]:
    """Schedule (tuned records -> untuned twins for bucket kernels -> dlight) and lower."""
    start = time.time()
    task_list = attach_twins(mod, tasks_of(mod, buckets)) if buckets else []
    applied: list[str] = []
    if database is not None:
        mod, applied = apply_database(mod, database=database, target=target, task_list=task_list,
                                      untuned_us=untuned_us)
    mod = schedule_like_untuned(mod, target=target, task_list=task_list)
    mod = apply_dlight(mod, target=target)
    ex = build_module(mod, target=target, cuda_graph=cuda_graph, scheduled=mod)
    logger.info("built for %s in %.1f s (%d tuned kernels)", target.kind.name, time.time() - start, len(applied))
    return ex, set(applied), task_list


@dataclasses.dataclass
class BuildResult:
    """What :func:`build_model` made: the exported model, the library, and the tuning coverage."""

    exported: object
    executable: tvm.runtime.Executable
    database: Path | None
    coverage: object | None  # tuning.apply.Coverage
    buckets: dict[str, list[int]]
    attention: list[str] = dataclasses.field(default_factory=list)  # tuned KV-cache attention kernels applied


def default_buckets(config, target: Target) -> dict[str, list[int]]:
    """Static entry points every build gets, tuned or not.

    On GPUs: every decode batch and prefill chunk bucket, so a step of that shape runs a
    static-shape function that CUDA graphs can capture (a symbolic batch cannot be captured).
    The untuned build has them too: tuned and untuned differ only in kernel schedules. On CPUs:
    none (no graphs to capture; a tuned database brings its own buckets).
    """
    if not is_gpu(target):
        return {}
    return buckets_for(config, prefill=[b for b in (128, 256, 512, 1024, 2048)])


def build_model(config, *, quantization: str, target: Target, database: str | Path | TunedDatabase | None = None,
                cuda_graph: bool = False, debug: bool = False,
                buckets: dict[str, list[int]] | None = None) -> BuildResult:
    """Export + build with static bucket entry points (:func:`default_buckets` unless given,
    plus the tuned database's buckets).

    Parameters
    ----------
    config : GPT2Config
    quantization : str
    target : tvm.target.Target
    database : path or TunedDatabase, optional
        A directory is opened with :meth:`TunedDatabase.open` for this target, model hash and
        quantization: a database for another arch/model/quantization is refused (one line naming
        the field), bad lines are skipped without touching the files, a TVM version mismatch warns.
    cuda_graph, debug : bool
    buckets : dict, optional
        Static entry points per phase.

    Returns
    -------
    BuildResult
    """
    db, cov = None, None
    buckets = {k: list(v) for k, v in (default_buckets(config, target) if buckets is None else buckets).items()}
    if database is not None and not isinstance(database, TunedDatabase):
        try:
            database = TunedDatabase.open(Path(database), target=target, model_hash=config.model_hash(),
                                          quantization=quantization)
        except DatabaseMismatchError as err:
            raise DatabaseMismatchError(
                f"{err}; the database that would match: {_matching_path(Path(database), config, quantization, target)}"
            ) from None
    if database is not None:
        db = database.ms
        for phase, values in database.buckets.items():
            buckets[phase] = sorted(set(buckets.get(phase, [])) | set(values))
    exported = export_model(config, quantization=quantization, target=target, buckets=buckets, debug=debug,
                            **template_plans(database.path if database is not None else None, target))
    prepared = prepare(exported.mod, target=target)
    attention: list[str] = []
    if database is not None and is_gpu(target):
        prepared, attention = apply_attention(prepared, database.path, target=target,
                                              key=attention_key(config, exported.scheme.activation_dtype))
    untuned_us = database.untuned_us if database is not None else None
    executable, applied, task_list = _build_prepared(prepared, target=target, database=db, cuda_graph=cuda_graph,
                                                     buckets=buckets, untuned_us=untuned_us)
    if db is not None:
        cov = coverage(task_list, applied)
        for line in cov.lines():
            logger.info(line)
        if task_list and cov.tuned == 0:
            logger.warning(
                "database %s tunes 0 of the %d bucket kernels of this build (it is for %s-%s, buckets %s): "
                "the build is untuned; the database that would match is %s", database.path, cov.total,
                database.meta.get("model"), database.meta.get("quantization"), database.buckets,
                _matching_path(database.path, config, quantization, target))
    return BuildResult(exported=exported, executable=executable, database=database.path if database else None,
                       coverage=cov, buckets=buckets, attention=attention)


def template_plans(db_dir, target) -> dict:
    """``export_model``'s template arguments for a build for ``target`` with the database at ``db_dir``:
    the fused norm + GEMV plan (``norm_gemv.json``) and the wgmma GEMM plan (``wgmma_gemm.json``)."""
    return {"norm_gemv": norm_gemv_plan_for(db_dir, target), "gemm": gemm_plan_for(db_dir, target)}


def _matching_path(path: Path, config, quantization: str, target: Target) -> str:
    """The databases next to ``path`` (same root) made for this model, arch and quantization."""
    root = path.parent.parent.parent if path.parent.parent.name == "local" else path.parent.parent
    found = TunedDatabase.matching(root, arch=arch_of(target), model_hash=config.model_hash(), quantization=quantization)
    return ", ".join(str(p) for p in found) if found else f"none under {root} (tune one for this model)"
