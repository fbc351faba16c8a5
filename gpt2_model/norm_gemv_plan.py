"""Which decode norm + linear pairs a build runs on :mod:`gpt2_model.norm_gemv`'s kernels
(:class:`NormGemvPlan`), and those kernels' plain-loop form: the same computation and signature,
unscheduled, for CPU builds of a fused model (tests check the model's wiring against HF)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .norm_gemv import NormGemvConfig, NormGemvError, NormGemvKey, _key_problem, is_norm_gemv_legal, make_norm_gemv

__all__ = ["NormGemvPlan", "make_norm_gemv_reference"]


def make_norm_gemv_reference(key: NormGemvKey, *, eps: float, name: str = "norm_gemv"):
    """The same computation and signature as :func:`make_norm_gemv`, unscheduled (plain loops, any
    target): what a CPU build of a fused model runs, so the model's wiring of the fused call (which
    norm, which weight, which epilogue) is checked against Hugging Face on a machine without a GPU."""
    problem = _key_problem(key, reference=True)
    if problem is not None:
        raise NormGemvError(f"fused norm + GEMV ({key.label()}): {problem}")
    from tvm import te, tirx  # pylint: disable=import-outside-toplevel

    B, K, N, f32 = key.batch, key.k, key.n, "float32"
    x = te.placeholder((B, 1, K), key.dtype, "x")
    gamma = te.placeholder((K,), key.dtype, "gamma")
    beta = te.placeholder((K,), key.dtype, "beta")
    w = te.placeholder((N, K), key.dtype, "W")
    bias = te.placeholder((N,), key.dtype, "bias")
    res = te.placeholder((B, 1, N), key.dtype, "res")
    k1, k2, k3 = (te.reduce_axis((0, K), name=n) for n in ("k1", "k2", "k3"))
    inv_k = tirx.const(1.0 / K, f32)
    if key.prologue == "norm":
        total = te.compute((B,), lambda b: te.sum(x[b, 0, k1].astype(f32), axis=k1), name="total")
        sq = te.compute((B,), lambda b: te.sum(te.power(x[b, 0, k2].astype(f32) - total[b] * inv_k, 2), axis=k2),
                        name="sq")
        xn = te.compute((B, K), lambda b, i: ((x[b, 0, i].astype(f32) - total[b] * inv_k)
                                              * tirx.rsqrt(sq[b] * inv_k + tirx.const(eps, f32))
                                              * gamma[i].astype(f32) + beta[i].astype(f32)).astype(key.dtype), name="xn")
    else:
        xn = te.compute((B, K), lambda b, i: x[b, 0, i], name="xn")
    y = te.compute((B, 1, N), lambda b, _, n: te.sum(xn[b, k3].astype(f32) * w[n, k3].astype(f32), axis=k3), name="y")

    def epilogue(v, b, n):
        if key.epilogue != "none":
            v = v + bias[n].astype(f32)
        if key.epilogue == "bias_residual":
            v = v + res[b, 0, n].astype(f32)
        if key.epilogue == "bias_gelu":
            v = tirx.const(0.5, f32) * v * (tirx.const(1, f32) + tirx.tanh(
                tirx.const(0.7978845608028654, f32) * (v + tirx.const(0.044715, f32) * v * v * v)))
        return v.astype(key.out_dtype)

    out = te.compute((B, 1, N), lambda b, z, n: epilogue(y[b, z, n], b, n), name="out")
    if key.prologue == "none":
        args = [x, w] + ([bias] if key.epilogue != "none" else []) + ([res] if key.epilogue == "bias_residual" else []) + [out]
    else:
        args = [x, gamma, beta, w] + ([bias] if key.epilogue != "none" else []) + [out]
    return te.create_prim_func(args).with_attr("global_symbol", name)


@dataclass
class NormGemvPlan:
    """Which decode norm+linear pairs a build fuses, and with which constants: ``configs`` maps
    :meth:`NormGemvKey.name` to a :class:`NormGemvConfig` (from the database's ``norm_gemv.json``).
    ``reference=True`` (tests): every named pair runs :func:`make_norm_gemv_reference`, on any target."""

    configs: Mapping[str, NormGemvConfig]
    reference: bool = False

    def config_for(self, key: NormGemvKey) -> NormGemvConfig | None:
        cfg = self.configs.get(key.name())
        if cfg is not None and self.reference:
            return cfg if _key_problem(key, reference=True) is None else None
        return cfg if cfg is not None and is_norm_gemv_legal(cfg, key) else None

    def make(self, key: NormGemvKey, cfg: NormGemvConfig, *, eps: float, name: str):
        if self.reference:
            return make_norm_gemv_reference(key, eps=eps, name=name)
        return make_norm_gemv(cfg, key, eps=eps, name=name)
