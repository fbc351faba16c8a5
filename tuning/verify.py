"""The numerical check of a tuning record: its kernel against the untuned kernel, same inputs.

Every record committed under ``databases/`` passed it on the card that measured it
(``prune_best(..., verify=make_verifier(...))``), the way llm.c checks each kernel before timing.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.runner import RPCConfig
from tvm.support.tar import tar
from tvm.target import Target

from .builder import build_kernel
from .runner import device_type
from .tasks import buffer_params
from .untuned import untuned_schedule

__all__ = ["make_verifier", "verify_record"]

logger = logging.getLogger(__name__)


def _random_args(func: tvm.tirx.PrimFunc, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for i, entry in enumerate(buffer_params(func)):
        if entry is None:
            raise ValueError(f"verify: parameter #{i} is a scalar; cannot fill it")
        name, shape, dtype = entry
        shape = [int(d) for d in shape]
        if dtype.startswith("float") or dtype.startswith("bfloat"):
            arr = rng.uniform(-1.0, 1.0, size=shape).astype("float32")
            arr = arr.astype(dtype) if dtype != "bfloat16" else arr
        elif dtype.startswith("int") or dtype.startswith("uint"):
            arr = rng.integers(0, 4, size=shape).astype(dtype)  # small: safe as indices
        elif dtype == "bool":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise ValueError(f"verify: unsupported dtype {dtype} of {name}")
        out.append(arr)
    return out


def _run_on(lib, device, args: list[np.ndarray]) -> list[np.ndarray]:
    tensors = [tvm.runtime.tensor(a, device=device) for a in args]
    lib["main"](*tensors)
    device.sync()
    return [t.numpy() for t in tensors]


def verify_record(
    record: ms.database.TuningRecord,
    *,
    target: Target,
    device_or_rpc: Any = None,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    seed: int = 0,
) -> bool:
    """Check a tuning record numerically against the untuned function.

    Builds the record's schedule and the untuned schedule of the same workload (dlight for GPU,
    unscheduled for ``llvm``), runs both on the same random inputs, and compares every buffer
    afterwards (outputs must match within ``rtol``/``atol``; inputs must be left intact).

    Parameters
    ----------
    record : TuningRecord
        The record to check.
    target : tvm.target.Target
        The build target.
    device_or_rpc : optional
        ``None`` (this machine's device of the target kind), a ``tvm.runtime.Device``, an
        ``tvm.rpc.RPCSession``, or ``(host, port, key)`` of a tracker to request a session from.
    rtol, atol : float
        Tolerances (``np.allclose`` semantics, NaNs equal).
    seed : int
        Seed of the random inputs.

    Returns
    -------
    bool
        True when all buffers match; False (logged with the worst error) otherwise.
    """
    mod = record.workload.mod
    sch = Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    ref_sch = untuned_schedule(mod, target=target)
    if ref_sch is None:
        raise ValueError("verify: no untuned schedule applies to this workload")
    func = mod["main"]
    args = _random_args(func, np.random.default_rng(seed))
    cand_lib = build_kernel(sch.mod, target)
    ref_lib = build_kernel(ref_sch.mod, target)

    session = device_or_rpc
    if isinstance(session, tuple):
        host, port, key = session
        session = RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                            session_timeout_sec=120).connect_server()
    if session is None:
        device = tvm.runtime.device_from_target(target)
    elif isinstance(session, tvm.runtime.Device):
        device = session
    else:  # an RPC session: ship both libraries
        device = session.device(device_type(target), 0)
        with tempfile.TemporaryDirectory() as tmp:
            libs = []
            for name, lib in (("cand", cand_lib), ("ref", ref_lib)):
                path = os.path.join(tmp, f"{name}.{tar.output_format}")
                lib.export_library(path, fcompile=tar)
                session.upload(path)
                libs.append(session.load_module(os.path.basename(path)))
            cand_lib, ref_lib = libs
    got = _run_on(cand_lib, device, args)
    want = _run_on(ref_lib, device, args)
    ok = True
    for entry, g, w in zip(buffer_params(func), got, want):
        if g.dtype == bool or np.issubdtype(g.dtype, np.integer):
            same = np.array_equal(g, w)
            worst = float(np.abs(g.astype(np.int64) - w.astype(np.int64)).max(initial=0))
        else:
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            # max-abs error over max-abs reference: a reduction over K = 3072 in fp16 differs by
            # accumulation order alone far beyond an element-wise rtol, never beyond this scale.
            diff = np.abs(g64 - w64)
            worst = float(np.nanmax(diff)) if diff.size else 0.0
            scale = float(np.nanmax(np.abs(w64))) if w64.size else 0.0
            new_nan = bool(np.any(np.isnan(g64) & ~np.isnan(w64)))
            same = not new_nan and worst <= atol + rtol * scale
        if not same:
            ok = False
            logger.warning("verify: buffer %s differs from the untuned result (max |diff| %.3g, "
                           "rtol %g of max |ref|, atol %g)", entry[0], worst, rtol, atol)
    return ok


def make_verifier(*, target: Target, device_or_rpc: Any = None, rtol: float = 1e-3,
                  atol: float = 1e-3) -> Callable[[ms.database.TuningRecord], bool]:
    """``verify_record`` with fixed settings, as ``prune_best(..., verify=...)`` wants it."""
    return functools.partial(verify_record, target=target, device_or_rpc=device_or_rpc,
                             rtol=rtol, atol=atol)
