"""Representative GPT-2 kernels, built the way the model's pipeline builds them.

These are stand-alone PrimFuncs for testing and measuring the design spaces without exporting a
whole model: each comes out of the relax nn frontend and the standard fusion passes
(FuseTransposeMatmul → LegalizeOps → AnnotateTIROpPattern → FoldConstant → FuseOps → FuseTIR),
so block names, buffer layouts and epilogues look like the fused kernels of the real model
(``fused_NT_matmul_add``, ``fused_NT_matmul_add_gelu``, ``fused_layer_norm`` ...). The
q4f16_1 kernel (uint32-packed 4-bit weights, fp16 scales, group 32, MLC-LLM's layout) is written
in TE with its ``dequantize`` stage fused into the matmul, as MLC-LLM's dequantize fusion does.

A dim given as a string (``"b"``) stays symbolic; an int makes it static. The decode GEMV of batch
``b`` is ``linear(b, 1, n, k)`` (x of shape ``(b, 1, k)``); a prefill GEMM of ``m`` tokens is
``linear(1, m, n, k)``.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.relax.frontend import nn

from ..pipeline import prepare

__all__ = ["linear", "q4_linear", "layer_norm", "softmax", "gelu", "add", "Q4_GROUP"]

Q4_GROUP = 32


def _fuse(mod: tvm.IRModule) -> tvm.IRModule:
    """The model's own preparation pipeline, so these kernels are the ones the partition makes."""
    return prepare(mod, target=tvm.target.Target({"kind": "llvm"}))


def _only_prim_func(mod: tvm.IRModule, hint: str) -> tirx.PrimFunc:
    funcs = [(gv.name_hint, f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    picked = [f for name, f in funcs if hint in name] or [f for _, f in funcs]
    if len(picked) != 1:
        raise RuntimeError(f"expected one fused kernel matching {hint!r}, got {[n for n, _ in funcs]}")
    return picked[0].with_attr("global_symbol", "main")


def _dim(d):
    return d if isinstance(d, str) else int(d)


def linear(
    b, m, n: int, k: int, *, bias: bool = True, epilogue: str | None = None, dtype: str = "float16"
) -> tirx.PrimFunc:
    """``y = epilogue(x @ W^T + bias)`` with ``x: (b, m, k)``, ``W: (n, k)``.

    Parameters
    ----------
    b, m : int or str
        Leading dims of ``x``; a string makes that dim symbolic.
    n, k : int
        Output and reduction sizes.
    bias : bool
        Add a bias of shape ``(n,)``.
    epilogue : {None, "gelu", "residual"}
        ``gelu``: GPT-2's erf GELU after the bias; ``residual``: add a ``(b, m, n)`` tensor.
    dtype : str
        Activation and weight dtype.

    Returns
    -------
    tvm.tirx.PrimFunc
        The fused kernel (``fused_NT_matmul*`` or ``NT_matmul``) with global symbol ``main``.
    """
    if epilogue not in (None, "gelu", "residual"):
        raise ValueError(f"epilogue must be None, 'gelu' or 'residual', got {epilogue!r}")

    class _Linear(nn.Module):
        def __init__(self):
            self.proj = nn.Linear(k, n, bias=bias, dtype=dtype)

        def forward(self, x, r=None):
            y = self.proj(x)
            if epilogue == "gelu":
                y = nn.gelu(y)
            elif epilogue == "residual":
                y = y + r
            return y

    spec = {"x": nn.spec.Tensor([_dim(b), _dim(m), k], dtype)}
    if epilogue == "residual":
        spec["r"] = nn.spec.Tensor([_dim(b), _dim(m), n], dtype)
    mod, _ = _Linear().export_tvm(spec={"forward": spec})
    return _only_prim_func(_fuse(mod), "matmul")


def layer_norm(b, m, n: int, *, dtype: str = "float16", eps: float = 1e-5) -> tirx.PrimFunc:
    """GPT-2's LayerNorm over the last dim of a ``(b, m, n)`` tensor."""

    class _LN(nn.Module):
        def __init__(self):
            self.ln = nn.LayerNorm(n, eps=eps, dtype=dtype)

        def forward(self, x):
            return self.ln(x)

    mod, _ = _LN().export_tvm(spec={"forward": {"x": nn.spec.Tensor([_dim(b), _dim(m), n], dtype)}})
    return _only_prim_func(_fuse(mod), "layer_norm")


def softmax(b, m, n: int, *, dtype: str = "float16") -> tirx.PrimFunc:
    """Softmax over the last dim of a ``(b, m, n)`` tensor, computed in float32 (as the LM
    sampler does with the logits)."""

    class _SM(nn.Module):
        def forward(self, x):
            return nn.softmax(x.astype("float32"), axis=-1)

    mod, _ = _SM().export_tvm(spec={"forward": {"x": nn.spec.Tensor([_dim(b), _dim(m), n], dtype)}})
    return _only_prim_func(_fuse(mod), "softmax")


def gelu(b, m, n: int, *, dtype: str = "float16") -> tirx.PrimFunc:
    """A stand-alone elementwise GELU of a ``(b, m, n)`` tensor."""

    class _G(nn.Module):
        def forward(self, x):
            return nn.gelu(x)

    mod, _ = _G().export_tvm(spec={"forward": {"x": nn.spec.Tensor([_dim(b), _dim(m), n], dtype)}})
    return _only_prim_func(_fuse(mod), "")


def add(b, m, n: int, *, dtype: str = "float16") -> tirx.PrimFunc:
    """A stand-alone residual add of two ``(b, m, n)`` tensors."""

    class _A(nn.Module):
        def forward(self, x, y):
            return x + y

    t = nn.spec.Tensor([_dim(b), _dim(m), n], dtype)
    mod, _ = _A().export_tvm(spec={"forward": {"x": t, "y": t}})
    return _only_prim_func(_fuse(mod), "add")


def q4_linear(b, m, n: int, k: int, *, bias: bool = True) -> tirx.PrimFunc:
    """q4f16_1 linear with the dequantize fused: ``y = x @ dequantize(Wq, scale)^T + bias``.

    ``Wq: (n, k // 8) uint32`` holds 8 4-bit values per word (element ``j`` of the word in bits
    ``4j .. 4j+3``), ``scale: (n, k // 32) float16``; an element dequantizes to
    ``(q - 7) * scale`` (MLC-LLM's q4f16_1 group quantization, group size 32).

    Returns
    -------
    tvm.tirx.PrimFunc
        Blocks ``dequantize``, ``NT_matmul`` and (with ``bias``) ``T_add``.
    """
    if k % Q4_GROUP:
        raise ValueError(f"k={k} must be a multiple of the group size {Q4_GROUP}")

    def shape(d):
        return tirx.Var(d, "int64") if isinstance(d, str) else tirx.IntImm("int64", int(d))

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    x = te.placeholder((shape(b), shape(m), i64(k)), "float16", name="x")
    wq = te.placeholder((i64(n), i64(k // 8)), "uint32", name="w_q")
    sc = te.placeholder((i64(n), i64(k // Q4_GROUP)), "float16", name="w_scale")

    def deq(j, kk):
        word = wq[j, kk // 8]
        shift = (kk % 8 * 4).astype("uint32")
        q = ((word >> shift) & tirx.const(15, "uint32")).astype("float16")
        return (q - tirx.const(7, "float16")) * sc[j, kk // Q4_GROUP]

    w = te.compute((i64(n), i64(k)), deq, name="dequantize")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute(
        (shape(b), shape(m), i64(n)),
        lambda i0, i1, j: te.sum(x[i0, i1, r] * w[j, r], axis=r),
        name="NT_matmul",
    )
    args = [x, wq, sc]
    if bias:
        bb = te.placeholder((i64(n),), "float16", name="bias")
        y = te.compute(y.shape, lambda i0, i1, j: y[i0, i1, j] + bb[j], name="T_add")
        args.append(bb)
    func = te.create_prim_func([*args, y])
    return func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
