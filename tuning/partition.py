"""Partition the prepared model into its TIR kernels, one static-shape task per bucket.

MetaSchedule measures static shapes only. The model is exported with static-shape entry points
per bucket (``batch_decode_b8``: a decode step of exactly 8 sequences; ``prefill_s1024``: a prefill
chunk of exactly 1024 tokens; see ``GPT2LMHeadModel.get_default_spec``), and the shared
preparation pipeline turns each into fused, static TIR kernels. A *task* is one such kernel;
its *weight* is how many times one step of that bucket calls it. Compile exports the same
bucket functions and prepares them the same way, so every tuned kernel is found again by its
structural hash; the runtime calls a bucket function when the step's shape equals the bucket
and the symbolic (dlight-scheduled) function otherwise.

The KV-cache attention kernels are called from inside the cache (packed functions,
pre-scheduled) and stay out; so do reshapes, which lowering turns into views.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import tvm
import tvm_ffi
from tvm import IRModule, relax, tirx
from tabulate import tabulate
from tvm.s_tir.analysis import estimate_tir_flops
from tvm.target import Target

from gpt2_model.export import export_model
from gpt2_model.model import bucket_function as model_bucket_function

from .pipeline import prepare

DEFAULT_PREFILL_BUCKETS = (128, 256, 512, 1024, 2048)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass
class Task:  # pylint: disable=too-many-instance-attributes
    """One static-shape kernel of one bucket function: what MetaSchedule tunes."""

    kernel: str  # the PrimFunc's global name in the prepared module
    phase: str  # decode | prefill
    bucket: int  # batch size (decode) or chunk length (prefill)
    kind: str  # gemm | gemv | reduction | elementwise
    func: tirx.PrimFunc
    weight: int  # calls per step of this bucket
    flops: float
    bytes: int  # fewest bytes moved: inputs read once, output written once

    @property
    def name(self) -> str:
        tag = f"b{self.bucket}" if self.phase == "decode" else f"s{self.bucket}"
        return f"{self.kernel}@{tag}"

    def mod(self) -> IRModule:
        return IRModule({"main": self.func.with_attr("global_symbol", "main")})

    twin: tirx.PrimFunc | None = None  # the symbolic kernel the untuned build runs, specialized
    twin_name: str | None = None  # that symbolic kernel's name in the prepared module

    def untuned_mod(self) -> IRModule | None:
        """The kernel the dynamic-shape untuned build runs at this shape (see :func:`attach_twins`)."""
        if self.twin is None:
            return None
        return IRModule({"main": self.twin.with_attr("global_symbol", "main")})

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in p.shape) for p in self.func.params if hasattr(p, "shape")]


def bucket_function(phase: str, value: int) -> str:
    """Name of the static entry point of a bucket (``gpt2_model.model``'s naming)."""
    return model_bucket_function(phase, value)


def buckets_for(config, *, prefill=DEFAULT_PREFILL_BUCKETS, batch=DEFAULT_BATCH_BUCKETS) -> dict[str, list[int]]:
    """Buckets that fit the model: chunks up to the prefill chunk size, batches up to max_batch_size."""
    return {
        "prefill": sorted({b for b in prefill if b <= config.prefill_chunk_size}) or [config.prefill_chunk_size],
        "decode": sorted({b for b in batch if b <= config.max_batch_size}) or [1],
    }


def call_counts(func: relax.Function) -> Counter:
    """How many times ``func`` calls each PrimFunc (call_tir), in a Counter."""
    counts: Counter = Counter()
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == call_tir:
            counts[expr.args[0].name_hint] += 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def is_reshape(name: str) -> bool:
    """Pure reshapes become views during lowering: nothing to tune."""
    return name.startswith("reshape") or (name.startswith("fused_reshape") and "add" not in name)


def classify(name: str, func: tirx.PrimFunc) -> str:
    """gemm / gemv / reduction / gather / elementwise, from the kernel's name and its output rows."""
    lowered = name.lower()
    if "matmul" in lowered:
        out = [p for p in func.params if hasattr(p, "shape")][-1]
        rows = 1
        for dim in list(out.shape)[:-1]:
            rows *= int(dim)
        return "gemv" if rows <= 64 else "gemm"
    if "norm" in lowered or "softmax" in lowered or "argmax" in lowered:
        return "reduction"
    if lowered.startswith("take") or "_take" in lowered:
        return "gather"
    return "elementwise"


def _nbytes(buf) -> int:
    size = 1
    for dim in buf.shape:
        size *= int(dim)
    return size * tvm.DataType(buf.dtype).bits // 8


def flops_bytes(func: tirx.PrimFunc, name: str) -> tuple[float, int]:
    """Estimated FLOPs, and the fewest bytes the kernel must move."""
    try:
        flops = float(estimate_tir_flops(IRModule({"main": func})))
    except Exception:  # pylint: disable=broad-except
        flops = 0.0
    buffers = [p for p in func.params if hasattr(p, "shape")]
    if "take" in name:  # a gather reads only the rows it returns, not the whole table
        return flops, 2 * _nbytes(buffers[-1]) + sum(_nbytes(b) for b in buffers[1:-1])
    return flops, sum(_nbytes(b) for b in buffers)


def tasks_of(prepared: IRModule, buckets: dict[str, list[int]]) -> list[Task]:
    """Tasks of the bucket functions present in a prepared module."""
    out, seen = [], set()
    for phase in ("decode", "prefill"):
        for value in buckets.get(phase, []):
            fname = bucket_function(phase, value)
            if fname not in [gv.name_hint for gv in prepared.get_global_vars()]:
                raise KeyError(f"the prepared module has no {fname}: export it with buckets")
            for name, count in sorted(call_counts(prepared[fname]).items()):
                func = prepared[name]
                if not isinstance(func, tirx.PrimFunc) or is_reshape(name) or name in seen:
                    continue  # a kernel shared by several buckets (lm_head on the last token) is one task
                seen.add(name)
                flops, nbytes = flops_bytes(func, name)
                out.append(Task(kernel=name, phase=phase, bucket=value, kind=classify(name, func), func=func,
                                weight=count, flops=flops, bytes=nbytes))
    return out


def specialize(func: tirx.PrimFunc, value: int) -> tirx.PrimFunc:
    """Bind the symbolic dim of ``func`` to ``value`` (one buffer binds the var everywhere)."""
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is not None and any(isinstance(d, tirx.Var) for d in shape):
            new = [tirx.IntImm("int64", value) if isinstance(d, tirx.Var) else d for d in shape]
            buf = tirx.decl_buffer(new, param.dtype, param.name, elem_offset=param.elem_offset)
            return func.specialize({param: buf})
    return func


SYMBOLIC_FUNCTION = {"decode": "batch_decode", "prefill": "prefill"}


def attach_twins(prepared: IRModule, task_list: list[Task]) -> list[Task]:
    """Set each task's ``twin``: the symbolic kernel of the dynamic-shape function that computes
    the same thing, specialized to the task's bucket (matched by structural equality).

    dlight picks its rule from the function it sees (``LowBatchGEMV`` for a symbolic batch, the
    SIMT ``Matmul`` for a static 8), so the untuned time of a task is its twin's.
    """
    symbolic = {phase: [n for n in call_counts(prepared[fn]) if isinstance(prepared[n], tirx.PrimFunc)]
                for phase, fn in SYMBOLIC_FUNCTION.items()}
    for task in task_list:
        static = task.func.without_attr("global_symbol")
        for name in symbolic[task.phase]:
            candidate = specialize(prepared[name], task.bucket).without_attr("global_symbol")
            if tvm_ffi.structural_equal(candidate, static):
                task.twin, task.twin_name = candidate, name
                break
    return task_list


def partition(config, *, quantization: str, target: Target, buckets: dict[str, list[int]] | None = None) -> list[Task]:
    """Export ``config`` with bucket entry points, prepare it, and list the tasks (with twins)."""
    buckets = buckets or buckets_for(config)
    exported = export_model(config, quantization=quantization, target=target, buckets=buckets)
    prepared = prepare(exported.mod, target=target)
    return attach_twins(prepared, tasks_of(prepared, buckets))


def table(task_list: list[Task]) -> str:
    """The partition as a text table (what `tune --list-kernels` prints)."""
    rows = []
    for t in task_list:
        shapes = " ".join("x".join(map(str, s)) for s in t.shapes())
        rows.append([t.name, t.kind, t.phase, t.bucket, shapes, f"{t.flops / 1e6:.2f}", f"{t.bytes / 1e6:.3f}", t.weight])
    return tabulate(rows, headers=["task", "kind", "phase", "bucket", "buffer shapes", "MFLOP", "MB", "calls/step"])


def summary(task_list: list[Task]) -> str:
    """Task count per bucket, one line each."""
    counts = Counter((t.phase, t.bucket) for t in task_list)
    return "\n".join(f"{phase} {'batch' if phase == 'decode' else 'chunk'} {b}: {n} tasks"
                     for (phase, b), n in sorted(counts.items()))
