"""Layer-by-layer comparison with Hugging Face, and kernel-by-kernel comparison of two builds.

Where our values come from (``compare_hf``): kernels are found by the *parameters they read*,
not by their names, so the mapping survives fusion changes and renaming (fused kernel names such
as ``fused_NT_matmul6_add6_add4`` carry counters that change with the model):

============== ===================================================== ============================
row            our value                                             Hugging Face (forward hook)
============== ===================================================== ============================
wte            output of the first kernel reading ``wte``            ``transformer.wte`` output
embed          input 0 of the kernel reading ``h.0.ln_1.weight``     ``transformer.drop`` output
h.i.ln_1       output of the kernel reading ``h.i.ln_1.*``           ``h.i.ln_1`` output
h.i.attn.c_attn output of the last kernel reading ``h.i.attn.c_attn.*`` ``h.i.attn.c_attn`` output
h.i.attn.core  output of ``attention_with_fused_qkv`` with layer i   input of ``h.i.attn.c_proj``
h.i.attn       ln_2 input - ln_1 input (c_proj fused with residual)  ``h.i.attn`` output[0]
h.i.ln_2       output of the kernel reading ``h.i.ln_2.*``           ``h.i.ln_2`` output
h.i.mlp.c_fc   output of the last kernel reading ``h.i.mlp.c_fc.*``  ``h.i.mlp.act`` output (the
               (bias and GELU are fused into it)                     c_fc output if not fused)
h.i.mlp        next block's ln_1 input (ln_f for the last) - ln_2 in ``h.i.mlp`` output
h.i            next block's ln_1 input (ln_f for the last)           ``h.i`` output[0]
ln_f           output of the kernel reading ``ln_f.*``               ``transformer.ln_f`` output
logits         the step's logits (last position)                     ``logits[0, -1]``
============== ===================================================== ============================

At a prefill the last block's output, its MLP output and ``ln_f`` are compared at the last
position only (the model runs the final norm on that row alone). Where a build fuses a norm into
the GEMV after it (``gpt2_model.norm_gemv``: GPU builds with such database entries) the norm's own
row is left out: that kernel never stores the normalized values.

The attention and MLP outputs are differences because the residual add is fused into the
``c_proj`` kernels (``fused_NT_matmul*_add*_add*``); the difference isolates the sub-layer's
contribution, so its error is measured relative to that contribution, not to the residual stream.

Error of a row: ``max |ours - ref|`` and ``rel = max |ours - ref| / max |ref|``. A row fails when
``rel > rtol``; the first failing row in execution order is where to look.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from typing import Any, Sequence

import numpy as np

from ..loader import CONV1D_SUFFIXES
from ..quantization import convert_params, dequantize_params, get_scheme
from .dump import DebugError, KernelCall, Step, load_dump, trace

#: Default relative tolerance of compare_hf per quantization (fp16 activations accumulate error).
HF_RTOL = {"q0f32": 1e-4, "q0f16": 2e-2, "q4f16_1": 2e-2}
#: Default relative tolerance of compare_builds per output dtype (integers must match exactly).
BUILD_RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class Row:
    """One compared value."""

    step: str
    name: str  # layer row (h.1.mlp) or kernel call (f12)
    kernel: str
    shape: tuple[int, ...]
    max_abs: float
    rel: float
    rtol: float
    replay_rel: float | None = None  # compare_builds: the kernel run on the other build's inputs
    note: str = ""
    #: No replay and an earlier row already failed: a difference here cannot be attributed.
    inherited: bool = False

    @property
    def own_error(self) -> float:
        """The error attributable to this row (the replay error when there is one)."""
        return self.rel if self.replay_rel is None else self.replay_rel

    @property
    def ok(self) -> bool:
        return self.inherited or _le(self.own_error, self.rtol)

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAIL"
        if not _le(self.rel, self.rtol):
            return "propagated" if self.replay_rel is not None else "diverged"
        return "ok"


def _le(value: float, bound: float) -> bool:
    return not math.isnan(value) and value <= bound


@dataclasses.dataclass
class Comparison:
    """Rows in execution order; ``first_failure`` is the first row beyond its tolerance."""

    kind: str  # "hf" or "builds"
    rows: list[Row]
    tokens: list[int]
    unmatched: list[str] = dataclasses.field(default_factory=list)

    @property
    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_failure is None

    def table(self) -> str:
        """The per-row error table (tabulate), the first failure marked with ``<<``."""
        from tabulate import tabulate  # pylint: disable=import-outside-toplevel

        first = self.first_failure
        replay = any(r.replay_rel is not None for r in self.rows)
        headers = ["step", "row", "kernel", "shape", "max abs", "rel err"] + (["replay rel"] if replay else []) + ["status"]
        body = []
        for r in self.rows:
            line = [r.step, r.name, r.kernel, "x".join(map(str, r.shape)), f"{r.max_abs:.3e}", f"{r.rel:.3e}"]
            if replay:
                line.append("-" if r.replay_rel is None else f"{r.replay_rel:.3e}")
            line.append(r.status + ("  << first" if r is first else "") + (f" ({r.note})" if r.note else ""))
            body.append(line)
        text = tabulate(body, headers=headers)
        if self.unmatched:
            text += "\n\nkernel calls present in one build only:\n  " + "\n  ".join(self.unmatched)
        verdict = "all rows within tolerance" if first is None else (
            f"first row beyond tolerance: {first.step} {first.name} ({first.kernel}), "
            f"rel err {first.own_error:.3e} > {first.rtol:g}")
        return f"{text}\n\n{verdict}"

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "kind": self.kind,
            "ok": self.ok,
            "tokens": self.tokens,
            "first_failure": None if first is None else {"step": first.step, "row": first.name, "kernel": first.kernel},
            "unmatched": self.unmatched,
            "rows": [
                {**{k: v for k, v in dataclasses.asdict(r).items()}, "shape": list(r.shape), "ok": r.ok, "status": r.status}
                for r in self.rows
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=_json_default)


def _json_default(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    raise TypeError(type(value))


def errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max |a - e|, max |a - e| / max |e|); NaN/Inf where either side is not finite."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise DebugError(f"cannot compare shapes {a.shape} and {e.shape}")
    if a.size == 0:
        return 0.0, 0.0
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        same = np.array_equal(a, e, equal_nan=True)
        return (0.0, 0.0) if same else (math.inf, math.inf)
    diff = float(np.abs(a - e).max())
    scale = float(np.abs(e).max())
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))


def layer_of(call: KernelCall) -> str:
    """A short tag of what a call computes, from the parameters it reads (``h.1.mlp.c_fc``)."""
    if call.name.startswith("attention") and len(call.args) > 1 and isinstance(call.args[1], int):
        return f"h.{call.args[1]}.attn.core"
    stems = []
    for param in call.param_names:
        if not param:
            continue
        stem = param[len("transformer."):] if param.startswith("transformer.") else param
        stem = stem.rsplit(".", 1)[0]
        if stem not in stems:
            stems.append(stem)
    return "+".join(stems)


# ----------------------------------------------------------------------------- vs Hugging Face
def _input(call: KernelCall) -> np.ndarray:
    for value, param in zip(call.args, call.param_names):
        if isinstance(value, np.ndarray) and not param:
            return value
    raise DebugError(f"kernel {call.name} has no activation input")


def _last_reading(step: Step, stem: str, *, first: bool = False) -> KernelCall:
    calls = [c for c in step.calls if any(p and p.startswith(stem + ".") for p in c.param_names)]
    if not calls:
        raise DebugError(f"{step.name}: no kernel reads parameters {stem}.*")
    return calls[0] if first else calls[-1]


def engine_activations(step: Step, n_layer: int) -> dict[str, tuple[np.ndarray, str]]:
    """Our per-layer values of one step, keyed like :func:`hf_activations` (see the module doc)."""
    t = "transformer"
    out: dict[str, tuple[np.ndarray, str]] = {}
    wte = _last_reading(step, f"{t}.wte", first=True)
    out["wte"] = (wte.output, wte.name)
    ln1 = [_last_reading(step, f"{t}.h.{i}.ln_1") for i in range(n_layer)]
    ln2 = [_last_reading(step, f"{t}.h.{i}.ln_2") for i in range(n_layer)]
    lnf = _last_reading(step, f"{t}.ln_f")
    attn = {c.args[1]: c for c in step.calls if c.name.startswith("attention") and isinstance(c.args[1], int)}
    out["embed"] = (_input(ln1[0]), ln1[0].name + " (input)")
    for i in range(n_layer):
        h = f"h.{i}"
        nxt = ln1[i + 1] if i + 1 < n_layer else lnf
        if not _fused(ln1[i]):  # a fused norm + GEMV kernel (gpt2_model.norm_gemv) never stores the norm
            out[f"{h}.ln_1"] = (ln1[i].output, ln1[i].name)
        c_attn = _last_reading(step, f"{t}.{h}.attn.c_attn")
        out[f"{h}.attn.c_attn"] = (c_attn.output, c_attn.name)
        if i in attn:
            out[f"{h}.attn.core"] = (attn[i].output, attn[i].name)
        out[f"{h}.attn"] = (_input(ln2[i]) - _input(ln1[i]), "(ln_2 in - ln_1 in)")
        if not _fused(ln2[i]):
            out[f"{h}.ln_2"] = (ln2[i].output, ln2[i].name)
        c_fc = _last_reading(step, f"{t}.{h}.mlp.c_fc")
        fused_act = any(k in c_fc.name for k in ("gelu", "relu", "tanh"))
        out[f"{h}.mlp.c_fc" if fused_act else f"{h}.mlp.c_fc(pre-act)"] = (c_fc.output, c_fc.name)
        nxt_in, ln2_in = _input(nxt), _input(ln2[i])
        if nxt_in.shape != ln2_in.shape and nxt_in.ndim == 3 and nxt_in.shape[1] == 1:
            ln2_in = ln2_in[:, -1:]  # a prefill's ln_f runs on the last position only
        out[f"{h}.mlp"] = (nxt_in - ln2_in, "(next in - ln_2 in)")
        out[h] = (_input(nxt), nxt.name + " (input)")
    if not _fused(lnf):
        out["ln_f"] = (lnf.output, lnf.name)
    out["logits"] = (step.logits, "logits")
    return out


def _fused(call) -> bool:
    """A fused layer norm + GEMV kernel: it reads the norm's parameters but stores the GEMV's output."""
    return "norm_gemv" in call.name


def hf_activations(hf_model, token_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Intermediate values of ``transformers.GPT2LMHeadModel`` on ``token_ids`` (forward hooks)."""
    import torch  # pylint: disable=import-outside-toplevel

    acts: dict[str, np.ndarray] = {}
    handles = []

    def _np(value):
        value = value[0] if isinstance(value, (tuple, list)) else value
        return value.detach().float().cpu().numpy()

    def after(name):
        return lambda _m, _inp, out: acts.__setitem__(name, _np(out))

    def before(name):
        return lambda _m, inp: acts.__setitem__(name, _np(inp))

    tr = hf_model.transformer
    handles.append(tr.wte.register_forward_hook(after("wte")))
    handles.append(tr.drop.register_forward_hook(after("embed")))
    for i, block in enumerate(tr.h):
        h = f"h.{i}"
        handles.append(block.ln_1.register_forward_hook(after(f"{h}.ln_1")))
        handles.append(block.attn.c_attn.register_forward_hook(after(f"{h}.attn.c_attn")))
        handles.append(block.attn.c_proj.register_forward_pre_hook(before(f"{h}.attn.core")))
        handles.append(block.attn.register_forward_hook(after(f"{h}.attn")))
        handles.append(block.ln_2.register_forward_hook(after(f"{h}.ln_2")))
        handles.append(block.mlp.c_fc.register_forward_hook(after(f"{h}.mlp.c_fc(pre-act)")))
        handles.append(block.mlp.act.register_forward_hook(after(f"{h}.mlp.c_fc")))
        handles.append(block.mlp.register_forward_hook(after(f"{h}.mlp")))
        handles.append(block.register_forward_hook(after(h)))
    handles.append(tr.ln_f.register_forward_hook(after("ln_f")))
    try:
        with torch.no_grad():
            out = hf_model(torch.tensor([list(token_ids)], dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    acts["logits"] = out.logits[0, -1].float().cpu().numpy()
    return acts


def reference_model(hf_model, quantization: str):
    """``hf_model`` with weights rounded as ``quantization`` stores them (q0f32: unchanged).

    Comparing against the stored weights measures our kernels, not the quantization error.
    """
    scheme = get_scheme(quantization)
    if scheme.name == "q0f32":
        return hf_model
    import torch  # pylint: disable=import-outside-toplevel

    model = copy.deepcopy(hf_model)
    state = model.state_dict()
    ours = {}
    for name, value in state.items():
        if name.startswith("transformer.") and not name.endswith((".attn.bias", ".attn.masked_bias")):
            arr = value.detach().float().cpu().numpy()
            ours[name] = arr.T.copy() if name.endswith(CONV1D_SUFFIXES) else arr
    rounded = dequantize_params(convert_params(ours, scheme))
    with torch.no_grad():
        for name, arr in rounded.items():
            arr = arr.T if name.endswith(CONV1D_SUFFIXES) else arr
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(arr)))
    return model


def compare_hf(
    *,
    engine,
    hf_model,
    prompt_ids: Sequence[int],
    decode_steps: int = 1,
    rtol: float | None = None,
) -> Comparison:
    """Run ``prompt_ids`` (+ greedy decode steps) through our engine and HF; compare per layer.

    Parameters
    ----------
    engine : Engine
        The build under test (any quantization; its weights are what is being checked too).
    hf_model : transformers.GPT2LMHeadModel
        The reference, in fp32. For fp16 / 4-bit builds its weights are first rounded the way the
        build stores them (:func:`reference_model`).
    prompt_ids : sequence of int
        Prompt tokens (at most one prefill chunk).
    decode_steps : int
        Greedy decode steps after the prefill; each is compared at its (last) position against a
        full HF forward of the sequence so far.
    rtol : float or None
        Relative tolerance per row; default :data:`HF_RTOL` of the build's quantization.

    Returns
    -------
    Comparison
        Rows ``wte``, ``embed``, ``h.i.*``, ``ln_f``, ``logits`` per step; ``first_failure`` is the
        first row with ``max|ours - ref| / max|ref| > rtol``.
    """
    quant = engine.exported.scheme.name
    rtol = HF_RTOL.get(quant, 2e-2) if rtol is None else rtol
    hf_model = reference_model(hf_model.eval(), quant)
    steps = trace(engine, prompt_ids, decode_steps=decode_steps)
    tokens = [s.next_token for s in steps]
    rows: list[Row] = []
    sequence = [int(t) for t in prompt_ids]
    for step in steps:
        if step.name != "prefill":
            sequence.append(step.input_ids[0])
        ref = hf_activations(hf_model, sequence)
        ours = engine_activations(step, engine.config.n_layer)
        for key, (value, kernel) in ours.items():
            if key not in ref:
                raise DebugError(f"no Hugging Face value for {key}")
            expected = ref[key]
            # decode steps: HF's last position; prefill: the last position where ours has only that
            # one (the final norm runs on the last position only)
            one = value.ndim == 3 and value.shape[1] == 1 and expected.ndim == 3 and expected.shape[1] > 1
            if key != "logits" and (step.name != "prefill" or one):
                expected = expected[:, -1:]
            if value.size != expected.size:
                raise DebugError(f"{step.name} {key}: ours has shape {value.shape}, HF {expected.shape}")
            max_abs, rel = errors(value.reshape(expected.shape), expected)
            rows.append(Row(step.name, key, kernel, tuple(expected.shape), max_abs, rel, rtol))
    return Comparison("hf", rows, tokens)


# ----------------------------------------------------------------------------- two builds
def _rtol_for(array: np.ndarray, rtol: float | None) -> float:
    if not np.issubdtype(array.dtype, np.floating):
        return 0.0
    return BUILD_RTOL.get(str(array.dtype), 1e-2) if rtol is None else rtol


def align(calls_a: Sequence[KernelCall], calls_b: Sequence[KernelCall]):
    """Pair the calls of two builds by signature (parameters read, shapes, dtypes), in order.

    Returns (pairs, only_a, only_b). Names are not used: the same computation may have another
    kernel name in another build.
    """
    sa, sb = [c.signature() for c in calls_a], [c.signature() for c in calls_b]
    matcher = difflib.SequenceMatcher(a=sa, b=sb, autojunk=False)
    pairs, only_a, only_b = [], [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs.extend(zip(calls_a[i1:i2], calls_b[j1:j2]))
        else:
            only_a.extend(calls_a[i1:i2])
            only_b.extend(calls_b[j1:j2])
    return pairs, only_a, only_b


def _replay(call_a: KernelCall, call_b: KernelCall, params_b: dict, device) -> float | None:
    """Run B's kernel on A's recorded arguments; error vs A's outputs (None when not replayable)."""
    import tvm  # pylint: disable=import-outside-toplevel

    if call_b.func is None or call_b.name.startswith("attention") or any(a is None for a in call_a.args):
        return None
    arrays = call_a.arrays
    last = arrays[-1][0]
    args = []
    for i, (value, param) in enumerate(zip(call_a.args, call_a.param_names)):
        if param and param in params_b:
            args.append(params_b[param])
        elif isinstance(value, np.ndarray):
            init = value.copy()
            if i == last:  # the output starts as garbage: a kernel that writes nothing cannot pass
                if np.issubdtype(init.dtype, np.floating):
                    init.fill(np.nan)
                else:
                    init.fill(np.iinfo(init.dtype).max if np.issubdtype(init.dtype, np.integer) else 0)
            args.append(tvm.runtime.tensor(init, device))
        else:
            args.append(value)
    call_b.func(*args)
    worst = 0.0
    for i, value in arrays:
        if call_a.param_names[i]:
            continue
        _, rel = errors(args[i].numpy(), value)
        worst = max(worst, rel) if not math.isnan(rel) else math.inf
    return worst


def compare_steps(
    steps_a: Sequence[Step],
    steps_b: Sequence[Step],
    *,
    rtol: float | None = None,
    replay: tuple | None = None,
) -> Comparison:
    """Compare two recorded runs call by call (and their logits); see :func:`compare_builds`."""
    if [s.name for s in steps_a] != [s.name for s in steps_b]:
        raise DebugError(f"the runs have different steps: {[s.name for s in steps_a]} vs {[s.name for s in steps_b]}")
    rows: list[Row] = []
    unmatched: list[str] = []
    for step_a, step_b in zip(steps_a, steps_b):
        if list(step_a.input_ids) != list(step_b.input_ids):
            # Recorded runs that chose different greedy tokens: later steps are not comparable.
            unmatched.append(f"{step_a.name} and later: the runs were fed different tokens "
                             f"({step_a.input_ids} vs {step_b.input_ids}); not compared")
            break
        pairs, only_a, only_b = align(step_a.calls, step_b.calls)
        unmatched += [f"{step_a.name} A f{c.index} {c.name} [{layer_of(c)}]" for c in only_a]
        unmatched += [f"{step_b.name} B f{c.index} {c.name} [{layer_of(c)}]" for c in only_b]
        for call_a, call_b in pairs:
            out_a, out_b = call_a.output, call_b.output
            max_abs, rel = errors(out_b, out_a)
            replay_rel = _replay(call_a, call_b, *replay) if replay is not None else None
            kernel = call_a.name if call_a.name == call_b.name else f"{call_a.name} | {call_b.name}"
            rows.append(Row(step_a.name, f"f{call_a.index}", kernel, tuple(out_a.shape), max_abs, rel,
                            _rtol_for(out_a, rtol), replay_rel, layer_of(call_a)))
        max_abs, rel = errors(step_b.logits, step_a.logits)
        rows.append(Row(step_a.name, "logits", "logits", tuple(step_a.logits.shape), max_abs, rel,
                        _rtol_for(step_a.logits, rtol)))
    failed = False
    for row in rows:
        if row.replay_rel is None and failed:
            row.inherited = True
        failed = failed or not row.ok
    return Comparison("builds", rows, [s.next_token for s in steps_a], unmatched)


def compare_builds(
    *,
    engine_a,
    engine_b,
    prompt_ids: Sequence[int],
    decode_steps: int = 1,
    rtol: float | None = None,
    replay: bool = True,
) -> Comparison:
    """Compare two builds of the same model kernel by kernel on identical inputs.

    Both engines run the prompt and ``decode_steps`` decode steps fed with A's greedy tokens.
    Calls are paired by signature (:func:`align`). For each pair the table shows the direct
    error of B's output against A's (``rel err``: includes differences propagated from earlier
    kernels) and, with ``replay``, the error of B's kernel run again on *A's recorded inputs*
    (``replay rel``: the kernel's own error). A row fails on its replay error when it has one, so
    ``first_failure`` is the first kernel that is itself wrong. The attention call lives in the
    KV cache (stateful) and is compared directly only.

    Parameters
    ----------
    engine_a, engine_b : Engine
        Builds of the same model and quantization, with the same weights (A is the reference).
    prompt_ids : sequence of int
        Prompt tokens (at most one prefill chunk).
    decode_steps : int
        Decode steps after the prefill.
    rtol : float or None
        Relative tolerance for every float output; default :data:`BUILD_RTOL` by output dtype
        (integer outputs must match exactly).
    replay : bool
        Re-run each of B's kernels on A's inputs (isolates the culprit).
    """
    if engine_a.exported.param_specs() != engine_b.exported.param_specs():
        raise DebugError("the two builds have different parameters: compare builds of one model and quantization")
    steps_a = trace(engine_a, prompt_ids, decode_steps=decode_steps)
    tokens = [s.input_ids[0] for s in steps_a[1:]]
    steps_b = trace(engine_b, prompt_ids, decode_steps=decode_steps, forced_tokens=tokens, keep_funcs=replay)
    params_b = None
    if replay:
        params_b = {name: t for (name, _, _), t in zip(engine_b.exported.param_specs(), engine_b.params)}
    return compare_steps(steps_a, steps_b, rtol=rtol, replay=(params_b, engine_b.device) if replay else None)


def compare_dumps(dir_a, dir_b, *, rtol: float | None = None) -> Comparison:
    """Compare two ``debug-chat`` dump directories call by call (direct errors, no replay)."""
    return compare_steps(load_dump(dir_a), load_dump(dir_b), rtol=rtol)


__all__ = [
    "Comparison", "Row", "compare_hf", "compare_builds", "compare_dumps", "compare_steps", "engine_activations",
    "hf_activations", "reference_model", "align", "errors", "layer_of", "HF_RTOL", "BUILD_RTOL",
]
