"""Hopper (sm_90a) GEMM kernels written directly in TVM 0.27's TIRx CUDA dialect.

``gemm.make_wgmma_gemm`` builds a TMA + mbarrier pipelined, optionally warp-specialized,
``wgmma.mma_async`` GEMM ``C = A @ W^T (+ bias)`` as a TIRx ``PrimFunc``; ``gemm.build``
compiles it for ``{"kind": "cuda", "arch": "sm_90a"}``. See ``gemm``'s docstring.
"""

from .gemm import GemmConfig, build, make_wgmma_gemm

__all__ = ["GemmConfig", "build", "make_wgmma_gemm"]
