"""LLM-aware tunable design spaces for MetaSchedule on CUDA.

MetaSchedule's generic CUDA rules lose to dlight's hand-written schedules on LLM kernels (decode
GEMVs above all). The spaces here start from dlight's schedules and open their constants to the
search instead: every knob is a sampling instruction (``sample_categorical`` /
``sample_perfect_tile``) in the trace, so MetaSchedule's evolutionary search re-samples and
mutates it, and a database record replays it.

Public API
----------
``classify(func)``
    ``"gemv"``, ``"gemm"``, ``"reduction"``, ``"elementwise"`` or ``"other"``.
``space_for(func, *, target)``
    A ``ScheduleFn`` space generator producing, per kernel class, the tunable design spaces
    (:mod:`.gemv`, :mod:`.gemm`, :mod:`.reduction`), the dlight schedule as a fixed design space
    (so it is always among the candidates), and optionally MetaSchedule's generic spaces.
(The traced dlight schedule of the untuned build: ``tuning.untuned.untuned_schedule``.)
``sample_candidates(func, *, target, num, seed)``
    Draw random candidates from a space the way the search's initial population does
    (decisions dropped, re-sampled, postprocessed) — for tests and random search.

Postprocessing: the spaces use MetaSchedule's CUDA tensor-core postprocessors, except that
``VerifyGPUCode`` is checked against the architecture's opt-in shared-memory limit
(:class:`VerifyGPUCodeOptIn`): the tensor-core schedules stage operands in *dynamic* shared
memory, which TVM's runtime enables beyond 48 KiB, while the target advertises the 48 KiB static
limit (see ``tuning.targets``). Without this, dlight's own tensor-core GEMM fails verification.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.postproc import PyPostproc
from tvm.target import Target

from ._analysis import (
    GEMV_MAX_ROWS,
    MatmulInfo,
    NotApplicable,
    as_module,
    has_reduction,
    matmul_info,
)
from ..intrinsics import preload_tensor_intrinsics
from ..targets import ARCH_LIMITS
from ..untuned import untuned_schedule
from .gemm import GEMM_VARIANTS, is_tensorcore_target, schedule_gemm_tensorcore
from .gemm_mma import MMA_VARIANTS, is_mma_target, schedule_gemm_mma
from .gemv import GEMV_VARIANTS, schedule_gemv
from .reduction import schedule_elementwise, schedule_row_reduction

__all__ = [
    "KERNEL_CLASSES",
    "Candidate",
    "MatmulInfo",
    "NotApplicable",
    "VerifyGPUCodeOptIn",
    "classify",
    "design_spaces",
    "matmul_info",
    "postprocs_for",
    "sample_candidates",
    "space_for",
]

logger = logging.getLogger(__name__)

KERNEL_CLASSES = ("gemv", "gemm", "reduction", "elementwise", "other")

#: Tries (seeds) at building one design space before giving it up.
_SPACE_ATTEMPTS = 16
_SPACE_SEED = 7919

#: Opt-in dynamic shared memory per block where ``tuning.targets`` does not know the arch.
_DEFAULT_OPTIN_SHARED = 227 * 1024


# ------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------


def classify(func) -> str:
    """Classify a kernel for design-space selection.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc or tvm.IRModule
        An unscheduled (fused) kernel; a module must hold exactly one PrimFunc.

    Returns
    -------
    str
        ``"gemv"`` (matmul with at most :data:`GEMV_MAX_ROWS` static rows, e.g. decode),
        ``"gemm"`` (larger or symbolic row count), ``"reduction"`` (layer norm, softmax, other
        reductions), ``"elementwise"`` (no reduction) or ``"other"``.
    """
    mod = as_module(func)
    info = matmul_info(mod)
    if info is not None:
        rows = None if info.m is None or info.batch is None else info.m * info.batch
        return "gemv" if rows is not None and rows <= GEMV_MAX_ROWS else "gemm"
    try:
        red = has_reduction(mod)
    except Exception:  # noqa: BLE001 - analysis failure: not a kernel we know
        return "other"
    return "reduction" if red else "elementwise"


# ------------------------------------------------------------------------------------------
# postprocessing
# ------------------------------------------------------------------------------------------


def _optin_shared(target: Target) -> int:
    arch = str(target.attrs.get("arch", ""))
    if arch in ARCH_LIMITS:
        return int(ARCH_LIMITS[arch].shared_memory_optin_per_block)
    return _DEFAULT_OPTIN_SHARED


def _with_shared_limit(target: Target, limit: int) -> Target:
    cfg = dict(target.export())
    cfg["max_shared_memory_per_block"] = int(limit)
    return Target(cfg)


@derived_object
class VerifyGPUCodeOptIn(PyPostproc):
    """MetaSchedule's ``VerifyGPUCode`` against the opt-in (dynamic) shared-memory limit.

    Everything else (threads per block, vector bytes, vthreads) is checked as upstream does;
    only ``max_shared_memory_per_block`` is raised to the architecture's opt-in maximum
    (227 KiB on sm_90), which TVM's CUDA runtime enables for ``shared.dyn`` buffers.
    A static ``shared`` allocation above 48 KiB then fails at compile time instead.

    Parameters
    ----------
    max_shared_memory_per_block : int, optional
        The limit; default: the arch's opt-in maximum from ``tuning.targets.ARCH_LIMITS``.
    """


    def __init__(self, max_shared_memory_per_block: int | None = None):
        super().__init__()
        self.limit = max_shared_memory_per_block
        self.inner = None

    def _initialize_with_tune_context(self, context) -> None:
        target = context.target
        limit = self.limit if self.limit is not None else _optin_shared(target)
        inner = ms.postproc.VerifyGPUCode()
        inner._initialize_with_tune_context(  # pylint: disable=protected-access
            ms.TuneContext(mod=context.mod, target=_with_shared_limit(target, limit),
                           task_name="verify", num_threads=1)
        )
        self.inner = inner

    def apply(self, sch: s_tir.Schedule) -> bool:
        if self.inner is None:
            raise RuntimeError("VerifyGPUCodeOptIn used before initialization with a TuneContext")
        return bool(self.inner.apply(sch))

    def clone(self) -> "VerifyGPUCodeOptIn":
        out = VerifyGPUCodeOptIn(self.limit)
        out.inner = self.inner
        return out


def postprocs_for(target: Target) -> list:
    """The postprocessors of the spaces: CUDA tensor-core defaults with
    :class:`VerifyGPUCodeOptIn` in place of ``VerifyGPUCode``."""
    preload_tensor_intrinsics()
    out = []
    for p in ms.postproc.Postproc.create("cuda-tensorcore"):
        out.append(VerifyGPUCodeOptIn() if isinstance(p, ms.postproc.VerifyGPUCode) else p)
    return out


# ------------------------------------------------------------------------------------------
# design spaces
# ------------------------------------------------------------------------------------------


#: A matmul with at least this many static rows (and at most ``GEMV_MAX_ROWS``: decode at b8-b64)
#: is a skinny GEMM as much as a GEMV: it gets the mma.sync space (whose skinny form keeps all rows
#: in one block, ``gemm_mma.SKINNY_MAX_ROWS``) beside the GEMV ones, and the search decides
#: (issue 11: tensor cores at b >= 16). The wmma space, which pads M to 128, is offered there only
#: on targets without mma.sync (sm_70/sm_75), from :data:`SKINNY_WMMA_MIN_ROWS` rows.
SKINNY_GEMM_MIN_ROWS = 8
SKINNY_WMMA_MIN_ROWS = 16


def _tensorcore_spaces(target: Target, *, wmma: bool = True) -> list[tuple[str, Callable]]:
    if not is_tensorcore_target(target):
        return []
    out = []
    if wmma:
        out += [(f"gemm_tc/{v}", (lambda s, v=v: schedule_gemm_tensorcore(s, variant=v))) for v in GEMM_VARIANTS]
    if is_mma_target(target):
        out += [(f"gemm_mma/{v}", (lambda s, v=v: schedule_gemm_mma(s, variant=v))) for v in MMA_VARIANTS]
    return out


def _named_spaces(kind: str, info: MatmulInfo | None, target: Target) -> list[tuple[str, Callable]]:
    if kind == "gemv":
        out = [(f"gemv/{v}", (lambda s, v=v: schedule_gemv(s, variant=v))) for v in GEMV_VARIANTS]
        rows = None if info is None or info.m is None or info.batch is None else info.m * info.batch
        if rows is not None and rows >= SKINNY_GEMM_MIN_ROWS:
            if is_mma_target(target):
                out += _tensorcore_spaces(target, wmma=False)
            elif rows >= SKINNY_WMMA_MIN_ROWS:
                out += _tensorcore_spaces(target)
        return out
    if kind == "gemm":
        return _tensorcore_spaces(target)
    if kind == "reduction":
        return [("row_reduction", schedule_row_reduction)]
    if kind == "elementwise":
        return [("elementwise", schedule_elementwise)]
    return []


def design_spaces(
    func, *, target: Target, include_dlight: bool = True, include_generic: bool = False
) -> list[tuple[str, s_tir.Schedule]]:
    """Build the named design spaces of ``func`` (what :func:`space_for` generates).

    Parameters
    ----------
    func : tvm.tirx.PrimFunc or tvm.IRModule
        The unscheduled kernel (static shapes for tuning).
    target : tvm.target.Target
        A CUDA target.
    include_dlight : bool
        Append the dlight schedule as a fixed design space.
    include_generic : bool
        Append MetaSchedule's generic spaces (``PostOrderApply`` with the ``cuda-tensorcore``
        rules), named ``generic/<i>``.

    Returns
    -------
    list of (name, tvm.s_tir.Schedule)
        Traced schedules with the decisions of one sample each; empty if nothing applies.
    """
    mod = as_module(func)
    return _build_spaces(s_tir.Schedule(mod, debug_mask=0), target=target,
                         include_dlight=include_dlight, include_generic=include_generic)


def _generic_spaces(mod, target: Target) -> list[tuple[str, s_tir.Schedule]]:
    """MetaSchedule's generic CUDA tensor-core spaces, or none where they break.

    ``MultiLevelTilingTensorCore`` raises while *generating* the space of some LLM kernels
    (the prefill lm_head on the last token, M = 1: "Back optional access" and "All the constant
    factors are required to be positive ... -1"), which would fail the whole task; here such a
    failure only drops the generic spaces.
    """
    ctx = ms.TuneContext(
        mod=mod,
        target=target,
        space_generator=ms.space_generator.PostOrderApply(
            sch_rules="cuda-tensorcore", postprocs=postprocs_for(target),
            mutator_probs="cuda-tensorcore"),
        task_name="generic",
        num_threads=1,
    )
    try:
        return [(f"generic/{i}", s) for i, s in enumerate(ctx.generate_design_space())]
    except Exception as err:  # noqa: BLE001
        logger.warning("MetaSchedule's generic spaces fail on this kernel: %s", _last_line(err))
        return []


def _build_spaces(sch: s_tir.Schedule, *, target: Target, include_dlight: bool,
                  include_generic: bool = False):
    mod = sch.mod
    kind = classify(mod)
    info = matmul_info(mod) if kind in ("gemv", "gemm") else None
    out = []
    for name, fn in _named_spaces(kind, info, target):
        # The decisions drawn while building a space are only an example (the search drops
        # them), but an unlucky draw (e.g. a tile that does not divide) fails the build of
        # the space: retry with other seeds before giving the space up.
        err_msg = None
        for attempt in range(_SPACE_ATTEMPTS):
            s = sch.copy()
            s.seed(_SPACE_SEED + attempt)
            try:
                fn(s)
            except NotApplicable as err:
                logger.debug("space %s does not apply: %s", name, err)
                err_msg = None
                break
            except Exception as err:  # noqa: BLE001 - a space that breaks must not break tuning
                err_msg = _last_line(err)
                continue
            out.append((name, s))
            err_msg = None
            break
        if err_msg is not None:
            logger.warning("space %s failed on this kernel: %s", name, err_msg)
    if include_dlight:
        dl = untuned_schedule(as_module(mod), target=target)
        if dl is not None:
            s = sch.copy()
            dl.trace.apply_to_schedule(s, remove_postproc=False)
            out.append(("dlight", s))
    if include_generic:
        out.extend(_generic_spaces(mod, target))
    return out


def space_for(
    func,
    *,
    target: Target,
    include_dlight: bool = True,
    include_generic: bool = False,
) -> ms.space_generator.SpaceGenerator:
    """The MetaSchedule space generator for one kernel.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc or tvm.IRModule
        The task's kernel (used to choose the spaces; the generator itself reads the function
        of the schedule MetaSchedule hands it, i.e. the task's).
    target : tvm.target.Target
        A CUDA target.
    include_dlight : bool
        Add the dlight schedule as a fixed design space (always among the candidates).
    include_generic : bool
        Also add MetaSchedule's generic CUDA tensor-core spaces (``PostOrderApply`` with the
        ``cuda-tensorcore`` rules); dropped for kernels where generating them fails.

    Returns
    -------
    tvm.s_tir.meta_schedule.space_generator.ScheduleFn
        The generator; its postprocessors are :func:`postprocs_for`.
    """
    if not isinstance(target, Target):
        raise TypeError("target must be a tvm.target.Target")
    if target.kind.name != "cuda":
        raise ValueError(f"the spaces are for CUDA targets, got {target.kind.name!r}")
    as_module(func)  # validate early: one clear error for bad input

    def generate(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
        return [s for _, s in _build_spaces(sch, target=target, include_dlight=include_dlight,
                                            include_generic=include_generic)]

    return ms.space_generator.ScheduleFn(
        generate,
        sch_rules=[],
        postprocs=postprocs_for(target),
        mutator_probs="cuda-tensorcore",
    )


# ------------------------------------------------------------------------------------------
# sampling (random search / tests)
# ------------------------------------------------------------------------------------------


class Candidate:
    """One postprocessed sample of a design space.

    Attributes
    ----------
    space : str
        Name of the design space it came from.
    sch : tvm.s_tir.Schedule
        The postprocessed schedule (``sch.mod`` builds).
    trace : tvm.s_tir.Trace
        Its trace without postprocessing instructions, with decisions (what a database stores
        and replays).
    """

    def __init__(self, space: str, sch: s_tir.Schedule, trace):
        self.space = space
        self.sch = sch
        self.trace = trace

    def __repr__(self) -> str:
        return f"Candidate(space={self.space!r})"


def sample_candidates(
    func,
    *,
    target: Target,
    num: int,
    seed: int = 1,
    include_dlight: bool = True,
    include_generic: bool = False,
    only: Sequence[str] | None = None,
    max_attempts: int | None = None,
) -> tuple[list[Candidate], dict]:
    """Draw random valid candidates from the design spaces of ``func``.

    Each draw picks a design space round-robin, drops its decisions, replays it on a fresh
    schedule with a new seed (re-sampling every knob) and runs the postprocessors — the same
    steps as the evolutionary search's initial population.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc or tvm.IRModule
        The unscheduled kernel.
    target : tvm.target.Target
        A CUDA target.
    num : int
        Number of valid candidates wanted (fewer come back if attempts run out).
    seed : int
        Base seed (>= 1); draw ``i`` uses ``seed + i``.
    include_dlight : bool
        Include the (single, fixed) dlight candidate first.
    include_generic : bool
        Also draw from MetaSchedule's generic spaces (see :func:`design_spaces`).
    only : sequence of str, optional
        Draw only from spaces whose name starts with one of these prefixes (e.g.
        ``("generic/",)``); the dlight candidate is kept if ``include_dlight``.
    max_attempts : int, optional
        Draws before giving up (default ``8 * num + 8``).

    Returns
    -------
    (list of Candidate, dict)
        The candidates and counters ``{"attempts", "invalid", "by_space": {name: count},
        "errors": {reason: count}}`` (why invalid draws failed: a postprocessor's name when it
        rejected the sample).
    """
    if num < 0:
        raise ValueError("num must be >= 0")
    if seed < 1:
        raise ValueError("seed must be >= 1")
    mod = as_module(func)
    spaces = design_spaces(mod, target=target, include_dlight=include_dlight,
                           include_generic=include_generic)
    postprocs = postprocs_for(target)
    ctx = ms.TuneContext(
        mod=mod,
        target=target,
        space_generator=ms.space_generator.ScheduleFn(
            lambda s: None, sch_rules=[], postprocs=postprocs, mutator_probs={}
        ),
        task_name="sample",
        num_threads=1,
    )
    postprocs = ctx.space_generator.postprocs
    out: list[Candidate] = []
    stats = {"attempts": 0, "invalid": 0, "by_space": {}, "errors": {}}
    tunable = [(n, s) for n, s in spaces
               if n != "dlight" and (only is None or any(n.startswith(p) for p in only))]
    fixed = [(n, s) for n, s in spaces if n == "dlight"]
    order = list(fixed)  # the dlight space once, then round-robin over the tunable spaces
    max_attempts = 8 * num + 8 if max_attempts is None else max_attempts
    i = 0
    while len(out) < num and stats["attempts"] < max_attempts and (order or tunable):
        if order:
            name, space = order.pop(0)
        else:
            name, space = tunable[i % len(tunable)]
        i += 1
        stats["attempts"] += 1
        cand = _replay(mod, space.trace, postprocs, seed=seed + stats["attempts"] - 1,
                       keep_decisions=(name == "dlight"))
        if isinstance(cand, str):
            stats["invalid"] += 1
            stats["errors"][cand] = stats["errors"].get(cand, 0) + 1
            continue
        sch, trace = cand
        out.append(Candidate(name, sch, trace))
        stats["by_space"][name] = stats["by_space"].get(name, 0) + 1
    return out, stats


def _replay(mod, trace, postprocs, *, seed: int, keep_decisions: bool):
    """Replay ``trace`` (re-sampling unless ``keep_decisions``) and postprocess.

    Returns ``(sch, trace)`` or a string saying why the sample is invalid.
    """
    tr = trace if keep_decisions else s_tir.schedule.Trace(trace.insts, {})
    sch = s_tir.Schedule(mod, seed=seed, debug_mask=0)
    try:
        tr.apply_to_schedule(sch, remove_postproc=True)
    except Exception as err:  # noqa: BLE001 - any failure makes the sample invalid
        return "replay: " + _last_line(err)
    replayed = sch.trace.simplified(remove_postproc=True)
    sch.enter_postproc()
    for p in postprocs:
        name = type(p).__name__
        if name == "_PyPostproc":  # the only Python postprocessor of the spaces
            name = "VerifyGPUCodeOptIn"
        try:
            if not p.apply(sch):
                return name
        except Exception as err:  # noqa: BLE001
            return f"{name}: " + _last_line(err)
    return sch, replayed


def _last_line(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]

