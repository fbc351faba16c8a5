"""The ONE preparation pipeline shared by partitioning (tuning) and compiling.

MetaSchedule finds a tuned record by the structural hash of a PrimFunc. A kernel tuned from a
module prepared one way is found at compile time only if compile prepares the module exactly the
same way, so both call :func:`prepare` and nothing else (``tests/tuning/test_pipeline.py`` checks
that every partitioned kernel is found again in the compile-time module).
"""

from __future__ import annotations

import tvm
from tvm import IRModule, relax, topi
from tvm.target import Target


def _take_clip(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``relax.take`` legalized with ``mode="clip"``: every index provably in bound.

    TVM's default ``"fast"`` mode reads whatever an index says (and TOPI warns "Fast mode
    segfaults when there are out-of-bounds indices" once per take, 6-17 times per build). The
    model's takes are the embedding rows of token ids and the rows of logit positions; clipping
    costs one min/max per index and turns a bad index into a clamped row instead of a read out of
    bounds. Only the (never tuned) gather kernels change; no tuned kernel contains a take.
    """
    return bb.call_te(topi.take, call.args[0], call.args[1], call.attrs.axis, mode="clip")


def preparation_passes(target: Target) -> list[tvm.transform.Pass]:
    """Relax passes from the exported module to fused, unscheduled TIR kernels.

    Order matters:
    - DispatchSampling / DispatchSortScan first: they replace ops by target-specific TIR and
      must see the original relax ops.
    - FuseTransposeMatmul before LegalizeOps: ``nn.Linear`` is ``matmul(x, permute_dims(W))``;
      fused at the relax level it legalizes to one ``NT_matmul`` kernel reading W in place,
      instead of a transpose kernel that copies every weight on every call.
    - LegalizeOps (``take`` with clipped indices: :func:`_take_clip`) -> AnnotateTIROpPattern -> FoldConstant -> FuseOps -> FuseTIR: lower ops to TIR,
      tag each kernel's pattern, then fuse elementwise epilogues (bias, gelu, residual add) into
      the matmuls that feed them, so each fused group is one PrimFunc (one tuning task).
    - DeadCodeElimination: drop kernels no longer called, so partition lists only live ones.
    """
    del target  # same passes for every target today; the argument keeps call sites honest
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps({"relax.take": _take_clip}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def prepare(mod: IRModule, *, target: Target) -> IRModule:
    """Run :func:`preparation_passes` on ``mod`` (under ``target``)."""
    with target:
        return tvm.transform.Sequential(preparation_passes(target))(mod)


def lowering_passes(target: Target) -> list[tvm.transform.Pass]:
    """Relax passes after scheduling: dataflow lowering, memory planning, CUDA graphs, VM."""
    del target
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.RewriteCUDAGraph(),  # only acts when relax.backend.use_cuda_graph is set
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
