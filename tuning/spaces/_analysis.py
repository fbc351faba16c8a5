"""Pattern analysis shared by the design spaces: what kind of kernel a PrimFunc is.

Everything here reads an *unscheduled* function and never changes it; the spaces repeat the
same (deterministic) normalization on the schedule they are given, so the trace replays.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

#: Largest row count (batch x tokens) that is scheduled as a GEMV rather than a GEMM.
GEMV_MAX_ROWS = 64


def as_module(func_or_mod) -> tvm.IRModule:
    """A one-function IRModule ``{"main": func}`` (the form MetaSchedule tasks have)."""
    if isinstance(func_or_mod, tvm.IRModule):
        funcs = [f for _, f in func_or_mod.functions_items() if isinstance(f, tirx.PrimFunc)]
        if len(funcs) != 1:
            raise ValueError(f"expected an IRModule with one PrimFunc, got {len(funcs)}")
        func = funcs[0]
    elif isinstance(func_or_mod, tirx.PrimFunc):
        func = func_or_mod
    else:
        raise TypeError(f"expected a tirx.PrimFunc or IRModule, got {type(func_or_mod).__name__}")
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _extent(e):
    return int(e) if isinstance(e, tirx.IntImm) else None


def _vars_of(region) -> set:
    out = set()
    for r in region.region:
        out |= set(tirx.analysis.undefined_vars(r.min))
    return out


@dataclass(frozen=True)
class MatmulInfo:
    """A matmul-like kernel ``C[s, i, j] += A[s, i, k] * B[s, j, k]`` (plus fused stages).

    ``m``/``n``/``k`` are the products of the I/J/K extents (``None`` where symbolic);
    ``batch`` the product of the S extents. ``b_inner_k`` tells whether K is the innermost
    (contiguous) axis of the weight operand (the ``NT`` layout GPT-2's linears have after
    ``FuseTransposeMatmul``). ``dequantize`` is true when the weight operand is produced by a
    fused spatial stage (e.g. q4f16_1 dequantize).
    """

    m: int | None
    n: int | None
    k: int | None
    batch: int | None
    b_inner_k: bool
    dequantize: bool
    in_dtype: str
    out_dtype: str


def _prod(xs):
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= x
    return out


def matmul_info(func_or_mod) -> MatmulInfo | None:
    """Describe a matmul-like kernel, or return ``None`` for anything else.

    The reduction block must read two operands ``A`` (activations, ``reads[0]``) and ``B``
    (weights) and write one: each non-unit iter is S (in A, B and C), I (A and C), J (B and C)
    or K (A and B, reduced). J and K are required; I may be missing (a single row, ``m = 1``).
    """
    mod = as_module(func_or_mod)
    sch = s_tir.Schedule(mod)
    root = sch.get_sblock("root", func_name="main")
    red = get_reduction_blocks(sch, sch.get_child_blocks(root))
    if red is None:
        return None
    block = sch.get(red[0])
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    a_vars, b_vars = _vars_of(block.reads[0]), _vars_of(block.reads[1])
    c_vars = _vars_of(block.writes[0])
    kinds, ext = {}, {k: [] for k in "SIJK"}
    for iv in block.iter_vars:
        v, e = iv.var, iv.dom.extent
        if isinstance(e, tirx.IntImm) and int(e) == 1:
            continue
        if iv.iter_type == tirx.IterVar.DataPar:
            if v in a_vars and v in b_vars and v in c_vars:
                kind = "S"
            elif v in a_vars and v in c_vars:
                kind = "I"
            elif v in b_vars and v in c_vars:
                kind = "J"
            else:
                return None
        elif iv.iter_type == tirx.IterVar.CommReduce and v in a_vars and v in b_vars and v not in c_vars:
            kind = "K"
        else:
            return None
        kinds[v] = kind
        ext[kind].append(_extent(e))
    if not ext["J"] or not ext["K"]:
        return None
    last_vars = tirx.analysis.undefined_vars(block.reads[1].region[-1].min)
    b_inner_k = bool(last_vars) and all(kinds.get(v) == "K" for v in last_vars)
    b_buf = block.reads[1].source
    dequantize = any(
        any(w.source.same_as(b_buf) for w in sch.get(p).writes) for p in sch.get_producers(red[0])
    )
    return MatmulInfo(
        m=_prod(ext["I"]),
        n=_prod(ext["J"]),
        k=_prod(ext["K"]),
        batch=_prod(ext["S"]),
        b_inner_k=b_inner_k,
        dequantize=dequantize,
        in_dtype=str(block.reads[0].source.dtype),
        out_dtype=str(block.writes[0].source.dtype),
    )


def has_reduction(func_or_mod) -> bool:
    """Whether any block of the function reduces."""
    mod = as_module(func_or_mod)
    sch = s_tir.Schedule(mod)
    infos = normalize_prim_func(sch)
    if infos is None:
        return any(
            iv.iter_type == tirx.IterVar.CommReduce
            for b in _all_blocks(mod["main"])
            for iv in b.iter_vars
        )
    return any(i.is_reduction() for i in infos)


def _all_blocks(func: tirx.PrimFunc) -> list:
    out = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, out.append), order="post")
    return [b for b in out if b.name_hint != "root"]


@dataclass(frozen=True)
class GemvLoops:
    """The GEMV main block after normalization: loops ``(b, n, k)``.

    ``x_index``: read index of the activation operand; ``w_indices``: read indices of the
    weight operand(s) (two for q4f16_1: packed words and scales); ``epilogue``: the one fused
    spatial consumer left after inlining, or ``None``.
    """

    main: s_tir.schedule.SBlockRV
    epilogue: s_tir.schedule.SBlockRV | None
    b: s_tir.schedule.LoopRV
    n: s_tir.schedule.LoopRV
    k: s_tir.schedule.LoopRV
    x_index: int
    w_indices: tuple


class NotApplicable(Exception):
    """The space does not apply to this function (raised while building a design space)."""


def normalize_gemv(sch: s_tir.Schedule) -> GemvLoops:
    """Inline the spatial stages around a GEMV and bring its loops to ``(b, n, k)``.

    Deterministic given the function, so it replays. Raises :class:`NotApplicable` when the
    function is not a GEMV with K innermost in the weight (the NT layout).
    """
    infos = normalize_prim_func(sch)
    if infos is None:
        raise NotApplicable("function cannot be normalized")
    infos = try_inline_contiguous_spatial(sch, infos)
    if not infos or len(infos) > 2 or not infos[0].is_reduction():
        raise NotApplicable("expected one reduction block followed by at most one spatial block")
    if len(infos) == 2 and not infos[1].is_injective():
        raise NotApplicable("epilogue is not injective")
    main = infos[0].block_rv
    block = sch.get(main)
    kinds = infos[0].dom_kind()
    if kinds not in ("SR", "SSR"):
        raise NotApplicable(f"unexpected iteration kinds {kinds}")
    ivars = [iv.var for iv in block.iter_vars]
    r_var = ivars[-1]
    reads = list(block.reads)
    used = [_vars_of(r) for r in reads]
    s_vars = ivars[:-1]
    if len(s_vars) == 2:
        # the batch iter is the S iter the weight does not use; the weight is the operand
        # with the N iter, which is the larger (or static) one
        e0, e1 = (_extent(iv.dom.extent) for iv in block.iter_vars[:2])
        if e0 is None or (e1 is not None and e0 <= e1):
            b_var, n_var = s_vars
        else:
            n_var, b_var = s_vars
        x_idx = [i for i, u in enumerate(used) if b_var in u and n_var not in u]
        w_idx = [i for i, u in enumerate(used) if n_var in u and b_var not in u]
    else:
        b_var, (n_var,) = None, s_vars
        x_idx = [i for i, u in enumerate(used) if n_var not in u and r_var in u]
        w_idx = [i for i, u in enumerate(used) if n_var in u]
    if len(x_idx) != 1 or not w_idx or len(x_idx) + len(w_idx) != len(reads):
        raise NotApplicable("cannot tell the activation from the weight operand")
    for i in w_idx:
        last = reads[i].region[-1].min
        if r_var not in tirx.analysis.undefined_vars(last):
            raise NotApplicable("weight is not K-innermost (NT layout expected)")
    loops = sch.get_loops(main)
    if b_var is None:
        n_loop, k_loop = loops
        b_loop = sch.add_unit_loop(main)
        sch.reorder(b_loop, n_loop, k_loop)
    else:
        pos = {v: i for i, v in enumerate(ivars)}
        b_loop, n_loop, k_loop = loops[pos[b_var]], loops[pos[n_var]], loops[pos[r_var]]
        sch.reorder(b_loop, n_loop, k_loop)
    epilogue = infos[1].block_rv if len(infos) == 2 else None
    return GemvLoops(main, epilogue, b_loop, n_loop, k_loop, x_idx[0], tuple(w_idx))


def uniform(n: int) -> list[float]:
    """Equal probabilities for a ``sample_categorical`` over ``n`` choices."""
    return [1.0 / n] * n
