"""Record every kernel call of a compiled GPT-2 (through the VM's instrument hook) and dump it.

The relax VM calls an *instrument* before and after every ``Call`` instruction with
``(func, symbol, before_run, ret_value, *args)``. After each call we copy the arguments of the
calls that are kernels: the library's TIR functions (destination-passing style, so the last
argument is the output) and the paged-KV-cache attention (``attention_with_fused_qkv``). VM
bookkeeping (``vm.builtin.*`` allocation / reshape / tuple helpers, the ``shape_func*`` and
``compute_symbolic_expr*`` host functions of shape lowering) is not recorded. Nothing is
rebuilt: the same library runs, with a Python callback around each call.

Arguments that are model parameters are recognised by their device pointer and named
(``KernelCall.param_names``); their values are copied once per recorder, not once per call.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tvm

#: Calls with these symbols are VM plumbing, not kernels.
_PLUMBING = re.compile(r"^(vm\.builtin\.|shape_func\d*$|compute_symbolic_expr\d*$)")
#: Packed functions of the paged KV cache whose arguments we do record (qkv in, attention out).
_ATTENTION = re.compile(r"^vm\.builtin\.attention_kv_cache_(attention\w*)$")
#: An object argument (the KV cache) is stored in the npz as this string.
_OBJECT_FMT = "<object {}>"


class DebugError(ValueError):
    """Bad input to a debug tool (missing dumps, mismatched builds, bad prompt)."""


def kernel_name(symbol: str) -> str | None:
    """The recorded name of a VM call symbol, or None when the call is VM plumbing."""
    match = _ATTENTION.match(symbol)
    if match:
        return match.group(1)
    if _PLUMBING.match(symbol):
        return None
    return symbol


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclasses.dataclass
class KernelCall:
    """One kernel call: its arguments after the call ran (the last array is the output).

    ``args[i]`` is an ndarray for a tensor, a Python int/float for a scalar and None for an object
    (the KV cache). ``param_names[i]`` names the model parameter passed as argument ``i``.
    """

    index: int
    name: str
    args: list[Any]
    param_names: list[str | None]
    func: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def filename(self) -> str:
        return f"f{self.index}_{_safe(self.name)}.npz"

    @property
    def arrays(self) -> list[tuple[int, np.ndarray]]:
        """(position, value) of the tensor arguments."""
        return [(i, a) for i, a in enumerate(self.args) if isinstance(a, np.ndarray)]

    @property
    def output(self) -> np.ndarray:
        """The last tensor argument (the output, destination-passing style)."""
        arrays = self.arrays
        if not arrays:
            raise DebugError(f"kernel call {self.index} ({self.name}) has no tensor argument")
        return arrays[-1][1]

    def params(self) -> set[str]:
        return {p for p in self.param_names if p}

    def signature(self) -> tuple:
        """What identifies the call across builds: parameters and tensor shapes/dtypes, not names."""
        return tuple(
            (p or "", tuple(a.shape), str(a.dtype)) if isinstance(a, np.ndarray) else (p or "", type(a).__name__)
            for a, p in zip(self.args, self.param_names)
        )


@dataclasses.dataclass
class Step:
    """One prefill or decode step: its input tokens, kernel calls and fp32 logits (vocab,)."""

    name: str
    input_ids: list[int]
    calls: list[KernelCall]
    logits: np.ndarray

    @property
    def next_token(self) -> int:
        return int(np.argmax(self.logits))

    def find(self, *, param: str | None = None, name_contains: str | None = None) -> list[KernelCall]:
        """Calls that take parameter ``param`` (exact name) and/or whose name contains a string."""
        out = []
        for call in self.calls:
            if param is not None and param not in call.params():
                continue
            if name_contains is not None and name_contains not in call.name:
                continue
            out.append(call)
        return out


class KernelRecorder:
    """Instrument an engine's VM and collect :class:`KernelCall` records.

    Use as a context manager; between ``with`` entry and exit every kernel call lands in
    ``calls`` (cleared with :meth:`take`). ``keep_funcs`` keeps each call's function handle so a
    kernel can be called again later (kernel replay in :func:`compare_builds`).
    """

    def __init__(self, engine, *, keep_funcs: bool = False):
        self.engine = engine
        self.keep_funcs = keep_funcs
        self.calls: list[KernelCall] = []
        specs = engine.exported.param_specs()
        self._param_by_ptr = {t.data_ptr(): name for (name, _, _), t in zip(specs, engine.params)}
        self._param_tensor = {name: t for (name, _, _), t in zip(specs, engine.params)}
        self._param_np: dict[str, np.ndarray] = {}

    def param_array(self, name: str) -> np.ndarray:
        if name not in self._param_np:
            self._param_np[name] = self._param_tensor[name].numpy()
        return self._param_np[name]

    def _instrument(self, func, symbol, before_run, ret_value, *args):  # pylint: disable=unused-argument
        if before_run:
            return 0
        name = kernel_name(str(symbol))
        if name is None:
            return 0
        values, names = [], []
        for arg in args:
            param = None
            if isinstance(arg, tvm.runtime.Tensor):
                param = self._param_by_ptr.get(arg.data_ptr())
                value = self.param_array(param) if param else arg.numpy()
            elif isinstance(arg, (bool, int, float)):
                value = arg
            else:
                value = None
            values.append(value)
            names.append(param)
        if any(isinstance(v, np.ndarray) for v in values):
            self.calls.append(KernelCall(len(self.calls), name, values, names, func if self.keep_funcs else None))
        return 0

    def take(self) -> list[KernelCall]:
        """The calls recorded since the last ``take`` (and forget them)."""
        calls, self.calls = self.calls, []
        return calls

    def __enter__(self) -> "KernelRecorder":
        self.engine.vm.set_instrument(self._instrument)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.vm.set_instrument(_no_instrument)


def _no_instrument(*_args):
    return 0


def trace(
    engine,
    prompt_ids: Sequence[int],
    *,
    decode_steps: int,
    forced_tokens: Sequence[int] | None = None,
    keep_funcs: bool = False,
    on_step: Callable[[Step], None] | None = None,
) -> list[Step]:
    """Prefill ``prompt_ids`` then ``decode_steps`` greedy decode steps, recording every kernel.

    Each step records the token-embedding call and the prefill/decode call. ``forced_tokens``
    feeds fixed tokens to the decode steps instead of the greedy ones (to drive two builds with
    identical inputs). ``on_step`` is called after each step (e.g. to write it to disk); when it
    is given the returned steps keep their logits but drop their calls, to bound memory.

    Prompts longer than the prefill chunk are refused: the dump of one prefill must hold the
    whole prompt, so that per-layer values line up with a single reference forward.
    """
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise DebugError("the prompt is empty: give at least one token")
    if len(ids) > engine.config.prefill_chunk_size:
        raise DebugError(
            f"the prompt has {len(ids)} tokens, more than the prefill chunk ({engine.config.prefill_chunk_size}); "
            "debug a shorter prompt"
        )
    if decode_steps < 0:
        raise DebugError(f"decode_steps must be >= 0, got {decode_steps}")
    if forced_tokens is not None and len(forced_tokens) < decode_steps:
        raise DebugError(f"{decode_steps} decode steps need {decode_steps} forced tokens, got {len(forced_tokens)}")
    window = engine.config.context_window_size
    if len(ids) + decode_steps > window:
        raise DebugError(f"{len(ids)} prompt tokens + {decode_steps} decode steps exceed the context window {window}")
    steps: list[Step] = []
    seq = engine.add_sequence()
    try:
        with KernelRecorder(engine, keep_funcs=keep_funcs) as rec:
            logits = engine.prefill(seq, ids)
            steps.append(Step("prefill", ids, rec.take(), logits.astype(np.float32)))
            _emit(steps, on_step)
            for k in range(decode_steps):
                token = int(forced_tokens[k]) if forced_tokens is not None else steps[-1].next_token
                logits = engine.decode([seq], [token])[0]
                steps.append(Step(f"decode_{k + 1}", [token], rec.take(), logits.astype(np.float32)))
                _emit(steps, on_step)
    finally:
        engine.remove_sequence(seq)
    return steps


def _emit(steps: list[Step], on_step) -> None:
    if on_step is not None:
        on_step(steps[-1])
        steps[-1].calls = []


# ----------------------------------------------------------------------------- files
def save_step(step: Step, out_dir: str | Path) -> Path:
    """Write ``out_dir/<step>/``: one ``f{i}_{kernel}.npz`` per call, ``logits.npz``, ``manifest.json``."""
    folder = Path(out_dir) / step.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    manifest = {"step": step.name, "input_ids": list(step.input_ids), "calls": []}
    for call in step.calls:
        arrays = {}
        for i, value in enumerate(call.args):
            if value is None:
                arrays[f"arg_{i}"] = np.array(_OBJECT_FMT.format("PagedKVCache"))
            else:
                arrays[f"arg_{i}"] = np.asarray(value)
        np.savez(folder / call.filename, **arrays)
        manifest["calls"].append({
            "index": call.index,
            "file": call.filename,
            "kernel": call.name,
            "args": [_arg_meta(v, p) for v, p in zip(call.args, call.param_names)],
        })
    np.savez(folder / "logits.npz", logits=step.logits)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def load_step(folder: str | Path) -> Step:
    """Read a folder written by :func:`save_step`."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise DebugError(f"{folder} is not a debug dump (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    calls = []
    for entry in manifest["calls"]:
        with np.load(folder / entry["file"]) as data:
            args: list[Any] = []
            for i, meta in enumerate(entry["args"]):
                value = data[f"arg_{i}"]
                if meta["kind"] == "object":
                    args.append(None)
                elif meta["kind"] == "int":
                    args.append(int(value))
                elif meta["kind"] == "float":
                    args.append(float(value))
                else:
                    args.append(value)
        calls.append(KernelCall(entry["index"], entry["kernel"], args, [a["param"] for a in entry["args"]]))
    with np.load(folder / "logits.npz") as data:
        logits = data["logits"]
    return Step(manifest["step"], manifest["input_ids"], calls, logits)


def _arg_meta(value: Any, param: str | None) -> dict:
    if value is None:
        return {"kind": "object", "shape": None, "dtype": None, "param": None}
    if isinstance(value, np.ndarray):
        return {"kind": "tensor", "shape": list(value.shape), "dtype": str(value.dtype), "param": param}
    kind = "float" if isinstance(value, float) else "int"
    return {"kind": kind, "shape": [], "dtype": kind, "param": None}


def load_dump(debug_dir: str | Path) -> list[Step]:
    """Every step folder of a ``debug-chat`` dump, in order (prefill, decode_1, decode_2, ...)."""
    debug_dir = Path(debug_dir)
    if not debug_dir.is_dir():
        raise DebugError(f"no debug dump at {debug_dir}")
    folders = [p for p in debug_dir.iterdir() if (p / "manifest.json").is_file()]

    def order(p: Path):
        return (0, 0) if p.name == "prefill" else (1, int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else 0)

    if not folders:
        raise DebugError(f"{debug_dir} holds no step folders (prefill/, decode_1/, ...)")
    return [load_step(p) for p in sorted(folders, key=order)]
