"""Partition the prepared model into its TIR kernels, and specialize symbolic dims to buckets.

A *kernel* is one PrimFunc of the prepared module (``tuning.pipeline.prepare``) called by the
decode step (``batch_decode``, symbolic ``batch_size``) or the prefill step (``prefill``,
symbolic ``seq_len``). Its *weight* is how many times one step calls it. The KV-cache attention
kernels are called from inside the cache (packed functions, pre-scheduled) and stay out; so do
reshapes, which lowering turns into views.

MetaSchedule measures static shapes only, so each kernel with a symbolic dim is specialized to
every bucket (prefill chunk 128..2048, decode batch 1..64); a *task* is one (kernel, bucket).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import tvm
from tvm import IRModule, relax, tirx
from tvm.target import Target

from .pipeline import prepare

DEFAULT_PREFILL_BUCKETS = (128, 256, 512, 1024, 2048)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

#: relax function run by one step of each phase, and the name of its symbolic dim.
PHASES = {"decode": ("batch_decode", "batch_size"), "prefill": ("prefill", "seq_len")}


@dataclasses.dataclass
class Kernel:  # pylint: disable=too-many-instance-attributes
    """One TIR kernel of a phase, with its cost per call at one bucket."""

    name: str  # the PrimFunc's global name in the prepared module
    phase: str  # decode | prefill
    kind: str  # gemm | gemv | reduction | elementwise
    func: tirx.PrimFunc  # the symbolic (dynamic-shape) PrimFunc
    symbolic_dims: tuple[str, ...]
    weight: int  # calls per step (per decode step / per prefill chunk)

    def shapes(self, func: tirx.PrimFunc | None = None) -> list[tuple[str, ...]]:
        f = func or self.func
        return [tuple(str(int(d)) if isinstance(d, tirx.IntImm) else str(d) for d in p.shape)
                for p in f.params if hasattr(p, "shape")]


@dataclasses.dataclass
class Task:
    """A kernel specialized to one bucket: what MetaSchedule tunes."""

    kernel: Kernel
    bucket: int  # value of the symbolic dim (batch size or chunk length); 0 if static
    func: tirx.PrimFunc  # static-shape PrimFunc
    flops: float
    bytes: int

    @property
    def name(self) -> str:
        tag = f"b{self.bucket}" if self.kernel.phase == "decode" else f"s{self.bucket}"
        return f"{self.kernel.name}@{tag}" if self.bucket else self.kernel.name

    @property
    def weight(self) -> int:
        return self.kernel.weight

    def mod(self) -> IRModule:
        return IRModule({"main": self.func.with_attr("global_symbol", "main")})


def buckets_for(config, *, prefill=DEFAULT_PREFILL_BUCKETS, batch=DEFAULT_BATCH_BUCKETS) -> dict[str, list[int]]:
    """Buckets that fit the model: chunks up to the prefill chunk size, batches up to max_batch_size."""
    return {
        "prefill": [b for b in prefill if b <= config.prefill_chunk_size] or [config.prefill_chunk_size],
        "decode": [b for b in batch if b <= config.max_batch_size] or [1],
    }


def _call_counts(func: relax.Function) -> Counter:
    counts: Counter = Counter()
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == call_tir:
            counts[expr.args[0].name_hint] += 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def symbolic_vars(func: tirx.PrimFunc) -> dict[str, tirx.Var]:
    out = {}
    for param in func.params:
        for dim in getattr(param, "shape", ()):
            if isinstance(dim, tirx.Var):
                out[dim.name] = dim
    return out


def specialize(func: tirx.PrimFunc, values: dict[str, int]) -> tirx.PrimFunc:
    """Bind symbolic shape vars (by name) to constants: specialize every buffer that uses them."""
    mapping = {}
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None or not any(isinstance(d, tirx.Var) and d.name in values for d in shape):
            continue
        new_shape = [tirx.IntImm("int64", values[d.name]) if isinstance(d, tirx.Var) and d.name in values else d
                     for d in shape]
        mapping[param] = tirx.decl_buffer(new_shape, param.dtype, param.name, elem_offset=param.elem_offset)
        break  # one buffer binds the var; specialize substitutes it everywhere
    return func.specialize(mapping) if mapping else func


def _is_reshape(func: tirx.PrimFunc, name: str) -> bool:
    return name.startswith("reshape") or (name.startswith("fused_reshape") and "add" not in name)


def classify(func: tirx.PrimFunc, name: str, phase: str) -> str:
    """gemm / gemv / reduction / elementwise, from the kernel's blocks and its phase."""
    del func
    lowered = name.lower()
    if "matmul" in lowered:
        return "gemv" if phase == "decode" else "gemm"
    if "norm" in lowered or "softmax" in lowered:
        return "reduction"
    return "elementwise"


def _nbytes(buf) -> int:
    size = 1
    for dim in buf.shape:
        size *= int(dim)
    return size * tvm.DataType(buf.dtype).bits // 8


def _flops_bytes(func: tirx.PrimFunc, name: str) -> tuple[float, int]:
    """Estimated FLOPs, and the fewest bytes the kernel must move (each input read once, output written once)."""
    from tvm.s_tir.analysis import estimate_tir_flops  # pylint: disable=import-outside-toplevel

    mod = IRModule({"main": func})
    try:
        flops = float(estimate_tir_flops(mod))
    except Exception:  # pylint: disable=broad-except
        flops = 0.0
    buffers = [p for p in func.params if hasattr(p, "shape")]
    if "take" in name:  # a gather reads only the rows it returns, not the whole table
        out = _nbytes(buffers[-1])
        return flops, 2 * out + sum(_nbytes(b) for b in buffers[1:-1])
    return flops, sum(_nbytes(b) for b in buffers)


def kernels(prepared: IRModule, *, phases=("decode", "prefill")) -> list[Kernel]:
    """The tunable kernels of each phase of a prepared module, with call counts."""
    out = []
    for phase in phases:
        fname, _ = PHASES[phase]
        counts = _call_counts(prepared[fname])
        # The embedding lookup runs once per step too (in `embed`, over the same tokens).
        for name, count in _call_counts(prepared["embed"]).items():
            counts[f"embed::{name}"] += count
        for key, count in sorted(counts.items()):
            name = key.split("::")[-1]
            func = prepared[name]
            if not isinstance(func, tirx.PrimFunc) or _is_reshape(func, name):
                continue
            # One symbolic dim per kernel: the phase's token count (embed's seq_len is it too).
            syms = tuple(symbolic_vars(func))
            out.append(Kernel(name=name, phase=phase, kind=classify(func, name, phase), func=func,
                              symbolic_dims=syms, weight=count))
    return out


def tasks(kernel_list: list[Kernel], buckets: dict[str, list[int]]) -> list[Task]:
    """Specialize each kernel to each bucket of its phase (static kernels: one task)."""
    out = []
    seen: set[tuple[str, int]] = set()
    for k in kernel_list:
        values = buckets[k.phase] if k.symbolic_dims else [0]
        for bucket in values:
            if (k.name, bucket) in seen:
                continue
            seen.add((k.name, bucket))
            func = specialize(k.func, {d: bucket for d in k.symbolic_dims}) if bucket else k.func
            if symbolic_vars(func):
                continue  # a dim we cannot bind (not the phase's): leave it to dlight
            flops, nbytes = _flops_bytes(func, k.name)
            out.append(Task(kernel=k, bucket=bucket, func=func, flops=flops, bytes=nbytes))
    return out


def partition(exported, *, target: Target, buckets: dict[str, list[int]] | None = None,
              phases=("decode", "prefill")) -> list[Task]:
    """Tasks of an exported model for ``target`` (through the shared preparation pipeline)."""
    prepared = prepare(exported.mod, target=target)
    buckets = buckets or buckets_for(exported.config)
    return tasks(kernels(prepared, phases=phases), buckets)


def table(task_list: list[Task]) -> str:
    """The partition as a text table (what `tune --list-kernels` prints)."""
    from tabulate import tabulate  # pylint: disable=import-outside-toplevel

    rows = []
    for t in task_list:
        shapes = " ".join("x".join(s) for s in t.kernel.shapes(t.func))
        rows.append([t.name, t.kernel.kind, t.kernel.phase, t.bucket or "-", ",".join(t.kernel.symbolic_dims) or "-",
                     shapes, f"{t.flops / 1e6:.2f}", f"{t.bytes / 1e6:.3f}", t.weight])
    return tabulate(rows, headers=["task", "kind", "phase", "bucket", "symbolic", "shapes", "MFLOP", "MB", "calls/step"])
