"""Programmatic dependent launch (PDL) for every CUDA kernel of a build (Hopper and later).

A decode step is ~80 short kernels replayed from one CUDA graph; between two of them the card
drains the first grid, flushes its memory and only then launches the next one's blocks. With
PDL (sm_90+: ``cudaLaunchAttributeProgrammaticStreamSerialization``) the next grid is launched
while the previous one still runs, and each of its blocks waits in ``griddepcontrol.wait``
until the previous grid has completed and its memory is visible — the launch latency overlaps
the previous kernel instead of following it.

:func:`pdl_pipeline` wraps a TIR pipeline so that its device finalization first runs
:func:`add_pdl`, which, for every device kernel (``calling_conv`` 2):

* puts ``griddepcontrol.launch_dependents`` and then ``griddepcontrol.wait`` at the top of
  the kernel body: no load or store of the kernel runs before the preceding grid is complete
  and flushed, so every dependence (read-after-write, write-after-read) is kept exactly as in a
  serialized stream, and chains of kernels stay ordered transitively; the trigger lets the
  following grid launch as soon as every block of this one has started;
* adds TVM's launch tag ``tirx.use_programtic_dependent_launch`` (TVM's spelling) to the
  kernel's ``tirx.kernel_launch_params``, so the runtime launches it with ``cuLaunchKernelEx``
  and the PDL attribute (inside a CUDA graph capture this becomes a programmatic edge).

A template kernel that calls :data:`gpt2_model.wgmma_gemm.PDL_SYNC` (the tensor-core norm + GEMV,
the wgmma GEMM: their weight loads or L2 prefetches come first, then that call waits for the
previous grid and triggers the next) gets the launch tag only: its weights are fetched while the
previous kernel still runs.

Kernels that are not launched after another kernel (the first of a stream, after a copy) wait on
nothing: ``griddepcontrol.wait`` returns at once without a programmatic predecessor. Builds for
CPUs and for CUDA archs below sm_90 never get the pass (:func:`supports_pdl`). It is off by default:
measured on an H100 (2026-12-07, ``bench/results/2026-12-07-h100-c``) the whole-step graphs captured
with it and gave HF's logits, but the decode step was 1% / 22% / 26% slower at b1 / b8 / b32 (on the
graph replayed alone too) and the prefill graph 6% slower at 128 tokens, 4-6% faster at 512 / 1024.
Why is not known yet (to look at: the early-launched blocks that wait in ``griddepcontrol.wait``
beside the running grid, and the trigger's place: ``GPT2K_PDL=wait`` builds the wait without the
explicit trigger, unmeasured). ``GPT2K_PDL=1`` turns it on for a build (:func:`pdl_mode`).
"""

from __future__ import annotations

import os

import tvm
from tvm import tirx

from gpt2_model.wgmma_gemm import PDL_SYNC

from .targets import cuda_sm_at_least

__all__ = ["DYN_SMEM_TAG", "PDL_ENV", "PDL_MODES", "PDL_TAG", "add_pdl", "add_pdl_late", "add_pdl_wait", "pdl_enabled",
           "pdl_mode", "pdl_pipeline", "supports_pdl"]

#: TVM's launch-parameter tag for PDL (the runtime's spelling, ``programtic``).
PDL_TAG = "tirx.use_programtic_dependent_launch"
#: Must stay the last launch tag when present (the runtime checks).
DYN_SMEM_TAG = "tirx.use_dyn_shared_memory"
_LAUNCH_PARAMS = "tirx.kernel_launch_params"
#: ``GPT2K_PDL=1`` builds with PDL (sm_90+; off by default; bench's library cache keys on it).
PDL_ENV = "GPT2K_PDL"
_DEVICE_KERNEL_LAUNCH = 2


def supports_pdl(target) -> bool:
    """Whether ``target`` is a CUDA arch with programmatic dependent launch (sm_90 and later)."""
    return cuda_sm_at_least(target, 90)


#: ``GPT2K_PDL`` values: ``1`` = the trigger (``launch_dependents``) and the wait at each kernel's top;
#: ``wait`` = the wait only (the dependent grid launches as this one's blocks exit: its launch still
#: overlaps this grid's tail, but its blocks do not sit beside the running grid); ``late`` = the wait,
#: then the trigger (a grid can launch its dependent only once it is itself running, so at most one
#: grid waits beside the running one: with the trigger first, a waiting grid triggers its own
#: dependent at once and a whole chain of waiting grids can pile up on the SMs, the suspected cause
#: of the 2026-12-07 slowdown); ``0`` / unset: off.
PDL_MODES = {"1": "trigger", "wait": "wait", "late": "late"}


def pdl_mode(target) -> str | None:
    """``"trigger"``, ``"late"``, ``"wait"`` or None (off): what ``GPT2K_PDL`` asks for a model build for
    ``target`` (sm_90+ CUDA only). Raises ValueError for a value that is not ``0``, ``1``, ``late`` or ``wait``."""
    value = os.environ.get(PDL_ENV, "0").strip() or "0"
    if value != "0" and value not in PDL_MODES:
        raise ValueError(f"{PDL_ENV}={value!r}: use 1 (trigger, then wait), late (wait, then trigger), "
                         "wait (wait only) or 0 (off)")
    return PDL_MODES.get(value) if supports_pdl(target) else None


def pdl_enabled(target) -> bool:
    """Whether a model build for ``target`` gets PDL (:func:`pdl_mode` is not None)."""
    return pdl_mode(target) is not None


def _grid_dep(action: str) -> tirx.Stmt:
    from tvm.script import tirx as T  # pylint: disable=import-outside-toplevel

    call = T.ptx.griddepcontrol.wait() if action == "wait" else T.ptx.griddepcontrol.launch_dependents()
    return tirx.Evaluate(call)


#: What each mode puts at the top of a kernel, in order.
_TOP = {"trigger": ("launch_dependents", "wait"), "late": ("wait", "launch_dependents"), "wait": ("wait",)}


def _with_pdl(func: tirx.PrimFunc, mode: str = "trigger") -> tirx.PrimFunc:
    attrs = func.attrs
    if attrs is None or int(attrs.get("calling_conv", 0)) != _DEVICE_KERNEL_LAUNCH:
        return func
    tags = [str(t) for t in (attrs.get(_LAUNCH_PARAMS) or [])]
    if PDL_TAG in tags:
        return func
    at = tags.index(DYN_SMEM_TAG) if DYN_SMEM_TAG in tags else len(tags)
    tags.insert(at, PDL_TAG)
    if PDL_SYNC in str(func.body):  # a template that waits (and triggers) in its own place: launch tag only
        return func.with_attr(_LAUNCH_PARAMS, tags)
    body = tirx.SeqStmt([*(_grid_dep(action) for action in _TOP[mode]), func.body])
    return func.with_body(body).with_attr(_LAUNCH_PARAMS, tags)


def _add_pdl(mode: str):
    @tvm.transform.module_pass(opt_level=0, name="AddProgrammaticDependentLaunch")
    def add(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = {}
        for gvar, func in mod.functions_items():
            out[gvar] = _with_pdl(func, mode) if isinstance(func, tirx.PrimFunc) else func
        return tvm.IRModule(out, attrs=mod.attrs)

    return add


#: Every device kernel of a module waits for its predecessor grid (after the trigger) and is launched
#: with PDL; :data:`add_pdl_wait`: the wait only.
_PASSES = {mode: _add_pdl(mode) for mode in _TOP}
add_pdl = _PASSES["trigger"]
add_pdl_wait = _PASSES["wait"]
#: The wait, then the trigger (``GPT2K_PDL=late``).
add_pdl_late = _PASSES["late"]


def pdl_pipeline(base: str = "default", mode: str = "trigger") -> str:
    """Register (once) and return the name of ``base`` (a registered TIR pipeline name) with
    :func:`add_pdl` (``mode="wait"`` / ``"late"``: :data:`add_pdl_wait` / :data:`add_pdl_late`) first among its
    device finalization passes."""
    from tvm.tirx import compilation_pipeline as cp  # pylint: disable=import-outside-toplevel

    name = f"gpt2k-pdl-{base}" + ("" if mode == "trigger" else f"-{mode}")
    if name in cp.PIPELINE_MAP:
        return name
    add_pass = _PASSES[mode]

    def factory():
        pipeline, fin_host, fin_dev = cp.get_tir_pipeline(base)

        def fin_dev_pdl():
            return tvm.transform.Sequential([add_pass, fin_dev()])

        return pipeline, fin_host, fin_dev_pdl

    cp.register_tir_pipeline(name, factory)
    return name
