"""The ONE preparation pipeline shared by partitioning (tuning) and compiling.

MetaSchedule finds a tuned record by the structural hash of a PrimFunc. A kernel tuned from a
module prepared one way is found at compile time only if compile prepares the module exactly the
same way, so both call :func:`prepare` and nothing else (``tests/tuning/test_pipeline.py`` checks
that every partitioned kernel is found again in the compile-time module).
"""

from __future__ import annotations

import tvm
from tvm import IRModule, relax
from tvm.target import Target


def preparation_passes(target: Target) -> list[tvm.transform.Pass]:
    """Relax passes from the exported module to fused, unscheduled TIR kernels.

    Order matters:
    - DispatchSampling / DispatchSortScan first: they replace ops by target-specific TIR and
      must see the original relax ops.
    - FuseTransposeMatmul before LegalizeOps: ``nn.Linear`` is ``matmul(x, permute_dims(W))``;
      fused at the relax level it legalizes to one ``NT_matmul`` kernel reading W in place,
      instead of a transpose kernel that copies every weight on every call.
    - LegalizeOps -> AnnotateTIROpPattern -> FoldConstant -> FuseOps -> FuseTIR: lower ops to TIR,
      tag each kernel's pattern, then fuse elementwise epilogues (bias, gelu, residual add) into
      the matmuls that feed them, so each fused group is one PrimFunc (one tuning task).
    - DeadCodeElimination: drop kernels no longer called, so partition lists only live ones.
    """
    del target  # same passes for every target today; the argument keeps call sites honest
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
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
