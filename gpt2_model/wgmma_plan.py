"""Which GEMMs a build runs on the Hopper wgmma kernel (:class:`GemmPlan`, from the database's
``wgmma_gemm.json``), and the kernel's arithmetic in plain TE (:func:`make_gemm_reference`: what a CPU
build runs in its place, to test the model's wiring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import tvm

from .wgmma_gemm import _GELU_C, EPILOGUES, GemmConfig, GemmKey, config_problem, make_gemm

__all__ = ["GemmPlan", "make_gemm_reference"]


def make_gemm_reference(key: GemmKey, *, name: str = "wgmma_gemm") -> tvm.tirx.PrimFunc:
    """The same arguments and arithmetic as :func:`make_gemm` in plain TE (fp32 sum, the
    epilogue, one rounding): what a CPU build runs in the model's place, to test the wiring."""
    from tvm import te, tirx  # pylint: disable=import-outside-toplevel

    n, k, dt = key.n, key.k, key.dtype
    a = te.placeholder(key.shape_in(), dt, name="A")
    w = te.placeholder((n, k), dt, name="W")
    ins = [a, w]
    bias = res = None
    if key.epilogue != "none":
        bias = te.placeholder((n,), dt, name="bias")
        ins.append(bias)
    if key.epilogue == "bias_residual":
        res = te.placeholder(key.shape_out(), dt, name="R")
        ins.append(res)
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute(key.shape_out(), lambda b, i, j: te.sum(a[b, i, r].astype("float32") * w[j, r].astype("float32"),
                                                              axis=r), name="acc")

    def out(b, i, j):
        v = acc[b, i, j]
        if bias is not None:
            v = v + bias[j].astype("float32")
        if key.epilogue == "bias_gelu":
            v = 0.5 * v * (1.0 + tirx.tanh(_GELU_C * (v + 0.044715 * v * v * v)))
        if res is not None:
            v = v + res[b, i, j].astype("float32")
        return v.astype(dt)

    c = te.compute(key.shape_out(), out, name="C")
    return te.create_prim_func(ins + [c]).with_attr("global_symbol", name)


@dataclass(frozen=True)
class GemmPlan:
    """Which prefill GEMMs a build runs on this kernel, and with which constants: ``configs`` maps
    :meth:`GemmKey.name` to a :class:`GemmConfig` (from the database's ``wgmma_gemm.json``).
    ``reference=True`` (tests): every named GEMM runs :func:`make_gemm_reference`, on any target."""

    configs: Mapping[str, GemmConfig]
    reference: bool = False
    prefetch_w: bool = False  # W's tiles to L2 before the PDL wait (builds with PDL: tuning.wgmma_tune.gemm_plan_for)

    def config_for(self, key: GemmKey) -> GemmConfig | None:
        cfg = self.configs.get(key.name())
        if cfg is None:
            return None
        return cfg if self.reference or config_problem(key, cfg) is None else None

    def make(self, key: GemmKey, cfg: GemmConfig, *, name: str):
        if self.reference:
            return make_gemm_reference(key, name=name)
        return make_gemm(key, cfg, name=name, prefetch_w=self.prefetch_w)

    def find(self, m: int, n: int, k: int, dtype: str = "float16", *,
             rows: bool = False) -> tuple[GemmKey, GemmConfig] | None:
        """The plan's (key, config) for an ``m x n x k`` GEMM (``rows``: of a decode batch), whichever
        its epilogue (GPT-2's layers differ in ``(n, k)``), or None."""
        for epilogue in EPILOGUES:
            key = GemmKey(m, n, k, epilogue, dtype, rows)
            cfg = self.config_for(key)
            if cfg is not None:
                return key, cfg
        return None
