"""The MetaSchedule builder of the tuning driver: a persistent local worker pool."""

from __future__ import annotations

import os

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from .intrinsics import preload_tensor_intrinsics

__all__ = ["BUILD_CONFIG", "PersistentLocalBuilder", "build_kernel", "build_config"]

#: PassContext config of every kernel build (tuning candidates, verification, ``tune --validate``,
#: the compiled library): ``tirx.use_async_copy`` lowers a software pipeline's async copy stage to
#: ``cp.async`` (the mma.sync space's pipelines); without it TVM keeps those copies synchronous.
#: Kernels without async pipeline stages are unaffected: the CUDA source of the committed sm_90
#: database's library is byte-identical with and without it (checked 2026-12-01).
BUILD_CONFIG = {"tirx.use_async_copy": True}

_BUILD_FUNC = "gpt2k.builder.build"


def build_config(target) -> dict:
    """The build config for ``target``: :data:`BUILD_CONFIG` on CUDA, nothing elsewhere."""
    return dict(BUILD_CONFIG) if target.kind.name == "cuda" else {}


def build_kernel(mod, target):
    """``tvm.compile`` one scheduled kernel module as the tuner's builder does (same config)."""
    import tvm  # pylint: disable=import-outside-toplevel

    with tvm.transform.PassContext(opt_level=3, config=build_config(target)):
        return tvm.compile(mod, target=target)


def _build_in_worker(mod, target, params):
    """MetaSchedule's default build under :func:`build_config` (registered in each worker)."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build  # pylint: disable=import-outside-toplevel

    with tvm.transform.PassContext(opt_level=3, config=build_config(target)):
        return default_build(mod, target, params)


def _builder_worker_init() -> None:
    # MetaSchedule's default_build imports the tensor intrinsics inside the timed build call;
    # do it once per worker, fast, outside the timeout.
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    preload_tensor_intrinsics()
    tvm_ffi.register_global_func(_BUILD_FUNC, _build_in_worker, override=True)


@derived_object
class PersistentLocalBuilder(PyBuilder):
    """MetaSchedule's ``LocalBuilder`` with a worker pool kept across batches.

    ``LocalBuilder`` starts fresh worker processes for every batch (each importing TVM and the
    tensor intrinsics, seconds per batch); this one keeps them, recycling each worker after
    ``max_uses`` builds (the reason upstream restarts them is a slow leak). It builds with
    MetaSchedule's default build/export functions under :data:`BUILD_CONFIG` (cp.async for async
    pipeline stages).

    Parameters
    ----------
    max_workers : int, optional
        Parallel build processes (default: usable CPU cores).
    timeout_sec : float
        Limit for one build.
    max_uses : int
        Builds per worker process before it is restarted.
    """

    def __init__(self, *, max_workers: int | None = None, timeout_sec: float = 60.0,
                 max_uses: int = 256):
        super().__init__()
        if max_workers is None:
            max_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.max_workers = int(max_workers)
        self.timeout_sec = float(timeout_sec)
        self._pool = PopenPoolExecutor(
            max_workers=self.max_workers,
            timeout=self.timeout_sec,
            initializer=_builder_worker_init,
            maximum_process_uses=max_uses,
        )

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results = []
        jobs = [(_BUILD_FUNC, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
        for res in self._pool.map_with_error_catching(lambda x: _worker_func(*x), jobs):
            if res.status == StatusKind.COMPLETE:
                results.append(BuilderResult(res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(
                    None, f"PersistentLocalBuilder: timeout, killed after {self.timeout_sec} s"))
            else:
                results.append(BuilderResult(
                    None, f"PersistentLocalBuilder: an exception occurred\n{res.value}"))
        return results

    def shutdown(self) -> None:
        """Stop the worker processes."""
        self._pool.shutdown()
