"""Making and building the template searches' candidates (prefill and decode attention, norm + GEMV).

:func:`make_all` parses the candidates' TVMScript in worker processes (it is most of a large search's
build time when done in one process). :func:`build_all` builds them:

The s_tir kernels (TVM's SIMT template, the wmma / mma.sync template) go through MetaSchedule's
parallel builder. The wgmma template (:mod:`tuning.attention_fa`) is a TIRx PrimFunc, which the
builder's default pipeline does not lower: those are built here in-process with the tirx pipeline
(:func:`gpt2_model.wgmma_build.build`, compiled for sm_90a through the compile hook) and exported
to a library file, so that every candidate comes back as a path the search loads the same way.
"""

from __future__ import annotations

import logging
import os
import tempfile

from gpt2_model.wgmma_build import build as build_tirx
from gpt2_model.wgmma_build import install_compile_hook
from gpt2_model.wgmma_gemm import KERNEL_ATTR

logger = logging.getLogger(__name__)

__all__ = ["build_all", "is_tirx_kernel", "make_all", "make_candidates"]

#: Below this many kernels :func:`make_all` parses them in this process (a spawned worker's imports cost ~3 s).
PARALLEL_FROM = 24


def is_tirx_kernel(func) -> bool:
    """Whether ``func`` is a TIRx kernel (carries :data:`gpt2_model.wgmma_gemm.KERNEL_ATTR`)."""
    return func.attrs is not None and KERNEL_ATTR in func.attrs


def _make_one(job: tuple):
    """``(PrimFunc, None)`` or ``(None, exception)`` for one ``(maker, args, kwargs)`` (in a worker process)."""
    maker, args, kwargs = job
    try:
        return maker(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - the caller decides which errors mean "not a candidate"
        return None, err


def make_all(maker, jobs: list[tuple], *, workers: int | None = None, **kwargs) -> list[tuple]:
    """``maker(*job, **kwargs)`` for every job: ``[(PrimFunc, None) or (None, exception)]`` in job order.

    A template search's candidates are TVMScript functions, and parsing one takes 0.1-0.4 s on one core
    (``inspect`` walks the Python stack for every macro call): ~700 decode candidates parsed one by one
    in the search's process were most of its "build" time on the GPU box (2026-12-07: 498 candidates
    "built" in 158 s). From :data:`PARALLEL_FROM` jobs on they are made in ``workers`` spawned processes
    (default: every core) and come back pickled (a PrimFunc pickles through its JSON form, ~10 ms);
    ``maker`` must be importable (a module-level function), its arguments picklable."""
    work = [(maker, tuple(job), kwargs) for job in jobs]
    workers = workers or os.cpu_count() or 1
    if len(work) < PARALLEL_FROM or workers < 2:
        return [_make_one(job) for job in work]
    from concurrent.futures import ProcessPoolExecutor  # pylint: disable=import-outside-toplevel
    from multiprocessing import get_context  # pylint: disable=import-outside-toplevel

    with ProcessPoolExecutor(max_workers=min(workers, len(work)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(_make_one, work, chunksize=max(1, len(work) // (4 * workers))))


def make_candidates(maker, jobs: list[tuple], *, expected: tuple, workers: int | None = None,
                    **kwargs) -> list[tuple[int, object]]:
    """``[(job index, PrimFunc)]`` for the jobs whose ``maker(*job, **kwargs)`` succeeded (:func:`make_all`); an
    error of an ``expected`` type (the template cannot take that configuration) is logged and its job left
    out, any other is raised."""
    out = []
    for i, (func, err) in enumerate(make_all(maker, jobs, workers=workers, **kwargs)):
        if err is None:
            out.append((i, func))
        elif isinstance(err, expected):
            logger.info("%s", err)
        else:
            raise err
    return out


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
