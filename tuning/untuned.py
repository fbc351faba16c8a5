"""The untuned build's schedules: dlight's rule list (the one place it is spelled out).

"Untuned" is what users get without a database: dlight ``ApplyDefaultSchedule`` with MLC-LLM's
rule order on GPUs, the unscheduled function (LLVM's default pipeline) on CPUs. The tuning driver
stores these schedules as baseline records and checks tuned records against them; compile
applies them to every kernel a database does not schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import IRModule
from tvm.s_tir import Schedule
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .targets import is_gpu
from .tasks import normalize

__all__ = ["apply_dlight", "dlight_rules", "untuned_schedule"]


def dlight_rules(target: Target) -> list:
    """The untuned schedule rules, in MLC-LLM's order (LowBatchGEMV included, as MLC does);
    ``[]`` for a CPU target (no rules: the function stays unscheduled)."""
    if not is_gpu(target):
        return []
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
    if not is_gpu(target):
        return mod
    with target:
        return dl.ApplyDefaultSchedule(*dlight_rules(target))(mod)


def untuned_schedule(mod, *, target: Target, rules: Sequence | None = None) -> Schedule | None:
    """The schedule the untuned build gives a function, as a traced ``Schedule``.

    Parameters
    ----------
    mod : IRModule or PrimFunc
        One kernel (an IRModule with one PrimFunc, or the PrimFunc).
    target : tvm.target.Target
        The build target.
    rules : sequence of dlight rules, optional
        Default :func:`dlight_rules`.

    Returns
    -------
    tvm.s_tir.Schedule or None
        For GPU targets the first dlight rule that applies (``ApplyDefaultSchedule`` semantics;
        its trace replays on a fresh ``Schedule`` of the same function); for ``llvm`` the
        unscheduled function (empty trace). ``None`` if no rule applies.
    """
    mod = normalize(mod)
    func = mod["main"]
    rules = dlight_rules(target) if rules is None else list(rules)
    if not rules:
        return Schedule(mod)
    with target:
        for rule in rules:
            sch = rule.apply(func, target, False)
            if sch is None:
                continue
            if isinstance(sch, (list, tuple)):
                sch = sch[0]
            return sch
    return None
