"""Building the Hopper wgmma kernels (:mod:`gpt2_model.wgmma_gemm`): sm_90a compilation and a mixed TIR pipeline.

* :func:`install_compile_hook`: TVM compiles CUDA source through ``tvm_callback_cuda_compile`` when
  a library is loaded; wgmma and setmaxnreg exist on ``sm_90a`` only, so source holding them is
  compiled for it, and a library's precompiled cubins (:mod:`gpt2_model.cuda_binary`) are served first.
* :func:`register_mixed_pipeline`: one ``tvm.compile`` uses one TIR pipeline, and neither the tirx
  one nor the default s_tir one accepts the other kind of PrimFunc: a model with these kernels next
  to its scheduled s_tir kernels is lowered by this pipeline (each function by its own kind's).
* :func:`build` / :func:`cuda_source` / :func:`compile_cubin` / :func:`ptxas_summary`: one kernel on
  its own (the search and ``scripts/wgmma_check.py``); ``compile_cubin`` runs nvcc without a GPU.
"""

from __future__ import annotations

import tvm

from .cuda_binary import install_compile_hook  # noqa: F401 (the load callback lives there; re-exported)
from .wgmma_gemm import KERNEL_ATTR, SM90A

__all__ = ["MIXED_PIPELINE", "build", "compile_cubin", "cuda_source", "has_wgmma_kernels", "install_compile_hook",
           "ptxas_summary", "register_mixed_pipeline", "target"]

#: ``tir_pipeline`` name for relax modules that mix these tirx kernels with ordinary s_tir
#: kernels (``register_mixed_pipeline``).
MIXED_PIPELINE = "wgmma_mixed"


def target() -> tvm.target.Target:
    """The sm_90a CUDA target (no GPU needed to build for it)."""
    return tvm.target.Target(SM90A)


def build(func: tvm.tirx.PrimFunc, tgt: tvm.target.Target | None = None):
    """Compile one kernel from ``make_wgmma_gemm`` (CUDA C -> nvcc, sm_90a) into an Executable.

    ``exe(A, W, bias, C)`` runs it (tvm tensors or torch CUDA tensors via DLPack);
    ``exe.mod.imports[0].inspect_source()`` is the generated CUDA.
    """
    tgt = tgt or target()
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    # The target scope makes tvm.support.nvcc's compile callback (called during tvm.compile on
    # a CUDA-enabled build) pick sm_90a; on a build/machine without CUDA the module keeps the
    # CUDA source and compiles it when loaded.
    with tgt:
        return tvm.compile(mod, target=tgt, tir_pipeline="tirx")


def cuda_source(exe) -> str:
    """The generated CUDA C of an Executable from ``build``."""
    return exe.mod.imports[0].inspect_source()


def compile_cubin(src: str, arch: str = "sm_90a") -> tuple[bytes, str]:
    """Compile generated CUDA source to a cubin for ``arch``; return ``(cubin, ptxas log)``.

    Uses ``nvcc -Xptxas -v`` when nvcc is on PATH (the log has registers / spills), else NVRTC
    through ``tvm.support.nvcc`` (empty log). Works without a GPU.
    """
    import os
    import shutil
    import subprocess
    import tempfile

    if shutil.which("nvcc"):
        with tempfile.TemporaryDirectory() as tmp:
            cu, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
            with open(cu, "w") as f:
                f.write(src)
            res = subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v",
                                  "-diag-suppress", "177", "-o", out, cu],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
            with open(out, "rb") as f:
                return f.read(), "\n".join(ln for ln in res.stderr.splitlines()
                                           if ln.startswith(("ptxas", "    ")))
    from tvm.support import nvcc

    return bytes(nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvrtc")), ""


def ptxas_summary(log: str) -> dict:
    """``{"registers": int, "spill_bytes": int}`` parsed from a ``ptxas -v`` log (or ``{}``)."""
    import re

    out = {}
    regs = re.search(r"Used (\d+) registers", log)
    if regs:
        out["registers"] = int(regs.group(1))
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", log)
    if spills:
        out["spill_bytes"] = sum(int(s) for s in spills)
    return out


def register_mixed_pipeline() -> str:
    """Register (once) and return ``MIXED_PIPELINE``: a TIR pipeline for mixed modules.

    TVM 0.27 picks one TIR pipeline per ``tvm.compile``: ``"tirx"`` rejects s_tir PrimFuncs
    (the dlight-scheduled kernels of a relax model) and the default s_tir pipeline rejects
    tirx PrimFuncs. This one lowers the functions carrying ``KERNEL_ATTR`` with the tirx
    pipeline and everything else with the s_tir pipeline, then merges the two modules (the
    finalization passes of both pipelines are the same). Use it as
    ``tvm.compile(relax_mod, target, tir_pipeline=register_mixed_pipeline())``.
    """
    from tvm.tirx import compilation_pipeline as cp

    if MIXED_PIPELINE in cp.PIPELINE_MAP:
        return MIXED_PIPELINE

    def factory():
        s_pipe, fin_host, fin_dev = cp.get_tir_pipeline("s_tir")
        x_pipe, _, _ = cp.get_tir_pipeline("tirx")

        @tvm.transform.module_pass(opt_level=0, name="WgmmaMixedPipeline")
        def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            ours, rest = {}, {}
            for gvar, func in mod.functions_items():
                is_ours = isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None \
                    and KERNEL_ATTR in func.attrs
                (ours if is_ours else rest)[gvar] = func
            out = s_pipe(tvm.IRModule(rest, attrs=mod.attrs)) if rest else None
            if ours:
                lowered = x_pipe(tvm.IRModule(ours, attrs=mod.attrs))
                if out is None:
                    out = lowered
                else:
                    out.update(lowered)
            return out if out is not None else mod

        return _pipeline, fin_host, fin_dev

    cp.register_tir_pipeline(MIXED_PIPELINE, factory)
    return MIXED_PIPELINE


def has_wgmma_kernels(mod: tvm.IRModule) -> bool:
    """Whether ``mod`` holds a kernel of this module (then build it with :func:`register_mixed_pipeline`)."""
    return any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs
               for _, f in mod.functions_items())
