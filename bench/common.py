"""What ``bench decode`` and ``bench prefill`` share: setup, variants, checks, measurement loops.

Setup resolves, in order: the device (``--device``), the architecture (``--arch``; ``cpu`` on
CPUs), the build target (``gpt2_model.runtime.target_for``), the model config (preset or HF
directory), the tuning database for (arch, model, quantization) (none -> untuned only, with
the ``tune`` command that would make one; another arch's database -> refused), the variants,
the environment snapshot and the roofline peak.

All variants share one seeded fp32 weight set: the TVM engines convert it to the stored form
of the quantization; the PyTorch peers get the same weights back in float (dequantized when
the scheme is quantized), so every variant computes the same function.

Before a TVM variant is timed, its logits for a short prompt are checked against a reference
(Hugging Face ``GPT2LMHeadModel`` in fp32 on CPU when torch is importable, else the untuned
engine), so a fast but wrong build is reported as an error instead of a speedup.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import env as envmod
from .build import DatabaseError, DatabaseInfo, find_database, load_engine
from .peers import TORCH_VARIANTS, torch_available
from .timing import Timer, make_timer, stats

__all__ = [
    "ALL_VARIANTS",
    "default_variants",
    "parse_variants",
    "parse_int_list",
    "default_quantization",
    "Setup",
    "setup",
    "make_row",
    "error_row",
    "check_logits",
    "measure_decode",
    "measure_prefill",
    "BenchError",
]

ALL_VARIANTS = ("untuned", "tuned", "torch-eager", "torch-compile")
_ALIASES = {"torch": ("torch-eager", "torch-compile"), "eager": ("torch-eager",), "compile": ("torch-compile",),
            "all": ALL_VARIANTS}
CHECK_PROMPT_LEN = 8
#: max |tvm - ref| / max |ref| allowed by the pre-timing check, per activation dtype
CHECK_RTOL = {"float32": 1e-3, "float16": 3e-2}


class BenchError(ValueError):
    """Bad benchmark options (one clear message for the CLI)."""


def parse_int_list(value, *, name: str) -> list[int]:
    """``"1,8,32"`` / ``8`` / ``[1, 8]`` -> ``[1, 8, 32]`` (positive, de-duplicated, in order)."""
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        try:
            items = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise BenchError(f"--{name} takes a comma-separated list of integers, got {value!r}") from None
    else:
        items = [int(v) for v in value]
    if not items or any(v <= 0 for v in items):
        raise BenchError(f"--{name} needs positive integers, got {value!r}")
    return list(dict.fromkeys(items))


def default_variants(device: envmod.DeviceSpec) -> list[str]:
    """``untuned,tuned,torch-eager`` on CPU (torch.compile is slow to compile there);
    ``untuned,tuned,torch-eager,torch-compile`` on CUDA."""
    if device.kind == "cpu":
        return ["untuned", "tuned", "torch-eager"]
    return list(ALL_VARIANTS)


def parse_variants(value, *, device: envmod.DeviceSpec) -> list[str]:
    """``--variants``: comma list of untuned, tuned, torch-eager, torch-compile; ``torch`` means
    both torch variants, ``all`` every variant; ``None`` -> :func:`default_variants`."""
    if value is None:
        return default_variants(device)
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for v in (x.strip() for x in items):
        if not v:
            continue
        if v in _ALIASES:
            out.extend(_ALIASES[v])
        elif v in ALL_VARIANTS:
            out.append(v)
        else:
            raise BenchError(f"unknown variant {v!r}; choose from {', '.join(ALL_VARIANTS)} (or torch, all)")
    if not out:
        raise BenchError("--variants is empty")
    return list(dict.fromkeys(out))


@dataclass
class Setup:
    """Everything resolved before the first variant runs."""

    model: str
    model_label: str
    config: Any
    quantization: str
    dtype: str
    device: envmod.DeviceSpec
    arch: str
    target: Any
    database: DatabaseInfo | None
    variants: list[str]
    env: dict[str, Any]
    peak: envmod.Peak | None
    timer: Timer
    seed: int
    notes: list[str] = field(default_factory=list)
    _params_fp32: dict[str, np.ndarray] | None = None
    _ref_logits: np.ndarray | None = None

    @property
    def params_fp32(self) -> dict[str, np.ndarray]:
        """The shared seeded fp32 weights (made on first use)."""
        if self._params_fp32 is None:
            from .peers import random_params

            self._params_fp32 = random_params(self.config, seed=self.seed)
        return self._params_fp32

    def peer_params(self) -> dict[str, np.ndarray]:
        """The float weights the TVM engines effectively compute with (dequantized if quantized)."""
        from gpt2_model.quantization import convert_params, dequantize_params, get_scheme

        scheme = get_scheme(self.quantization)
        if scheme.kind == "none":
            return self.params_fp32
        return dequantize_params(convert_params(self.params_fp32, scheme))


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_quantization(device: envmod.DeviceSpec) -> str:
    """``q0f16`` on CUDA; ``q0f32`` on CPUs, which have no native fp16 arithmetic (LLVM emulates it,
    several times slower than fp32), so the default run stays quick there."""
    return "q0f16" if device.kind == "cuda" else "q0f32"


def setup(*, model: str, quantization: str | None, device: str, arch: str, variants, database_dir: str,
          database: str | None, seed: int, peak_bw: float | None, peak_tflops: float | None,
          log: Callable[[str], None] = _log_default) -> Setup:
    """Resolve device, arch, target, config, database, variants, environment and peak.

    Raises
    ------
    BenchError
        Unknown model/quantization/variant, bad device or arch.
    DatabaseError
        The database found for the tuned variant belongs to another arch (or is corrupt).
    """
    from gpt2_model.config import ConfigError, get_config, model_name
    from gpt2_model.quantization import QuantizationError, get_scheme

    try:
        dev = envmod.resolve_device(device)
    except ValueError as e:
        raise BenchError(str(e)) from None
    try:
        config = get_config(model)
    except ConfigError as e:
        raise BenchError(str(e)) from None
    quantization = quantization or default_quantization(dev)
    try:
        scheme = get_scheme(quantization)
    except QuantizationError as e:
        raise BenchError(str(e)) from None
    label = model_name(model)
    if dev.kind == "cpu":
        if arch not in ("auto", "cpu", None):
            raise BenchError(f"--arch {arch} applies to CUDA devices; this run is on the CPU (use --device cuda)")
        arch_name = "cpu"
    else:
        if arch in ("auto", None):
            arch_name = envmod.detect_arch(dev)
        elif not str(arch).startswith("sm_"):
            raise BenchError(f"--arch must be auto or sm_XX (e.g. sm_90), got {arch!r}")
        else:
            arch_name = str(arch)
    from gpt2_model.runtime import target_for

    try:
        target = target_for(dev.name, None if dev.kind == "cpu" else arch_name)
    except ValueError as e:  # unknown arch (tuning.targets.UnknownArchError), bad device
        raise BenchError(f"--arch {arch_name}: {e}") from None
    vs = parse_variants(variants, device=dev)
    notes: list[str] = []
    db = None
    if "tuned" in vs:
        db, msg = find_database(database_dir=database_dir, arch=arch_name, model=label,
                                quantization=quantization, explicit=database, target=target)
        if db is None:
            notes.append(msg)
            log(msg)
            vs = [v for v in vs if v != "tuned"]
        else:
            log(f"tuned variant uses database {db.path} (hash {db.hash[:12]})")
    elif database is not None:
        raise BenchError("--database given but the tuned variant is not among --variants")
    if any(v in TORCH_VARIANTS for v in vs) and not torch_available():
        notes.append("torch/transformers not importable: PyTorch peer rows are skipped")
    if scheme.kind != "none" and any(v in TORCH_VARIANTS for v in vs):
        notes.append(f"PyTorch peers run the dequantized {quantization} weights in {scheme.activation_dtype} "
                     "(unquantized kernels, same function)")
    env, peak = env_and_peak(dev, database=db.to_dict() if db else None, arch=arch_name,
                             dtype=scheme.activation_dtype, peak_bw=peak_bw, peak_tflops=peak_tflops, notes=notes)
    return Setup(model=model, model_label=label, config=config, quantization=quantization,
                 dtype=scheme.activation_dtype, device=dev, arch=arch_name, target=target, database=db,
                 variants=vs, env=env, peak=peak, timer=make_timer(dev), seed=seed, notes=notes)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def make_row(s: Setup, *, variant: str, phase: str, batch: int, prompt_len: int | None, gen_len: int | None,
             seq_len: int | None, **fields) -> dict[str, Any]:
    """A decode/prefill row with every schema key (unset figures ``None``)."""
    from .report import test_label

    row = {
        "model": s.model_label,
        "quantization": s.quantization,
        "device": s.device.name,
        "arch": s.arch,
        "variant": variant,
        "test": test_label(phase=phase, batch=batch, prompt_len=prompt_len, gen_len=gen_len, seq_len=seq_len),
        "phase": phase,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "seq_len": seq_len,
        "status": "ok",
        "error": None,
        "tok_s": None,
        "ms": None,
        "gpu_ms": None,
        "gb_s": None,
        "pct_bw": None,
        "tflops": None,
        "pct_peak": None,
        "bytes_per_step": None,
        "flops": None,
        "speedup_vs_untuned": None,
        "samples": {"wall_ms": [], "gpu_ms": None, "tok_s": []},
        "build": None,
        "notes": [],
    }
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}")
    row.update(fields)
    return row


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (TVM errors carry long tracebacks)."""
    msg = str(exc).strip().splitlines()
    text = next((m for m in msg if m.strip() and not m.startswith("Traceback")), "") if msg else ""
    return f"{type(exc).__name__}: {text}".strip().rstrip(":")


def error_row(s: Setup, *, status: str = "error", error: str, **kw) -> dict[str, Any]:
    """A row for a point that could not be measured (``status`` error or skipped)."""
    return make_row(s, status=status, error=error, **kw)


# ---------------------------------------------------------------------------------------------
# Engines and checks
# ---------------------------------------------------------------------------------------------
def reference_logits(s: Setup) -> np.ndarray | None:
    """Last-position logits of the check prompt from HF GPT-2 in fp32 on CPU (None without torch)."""
    if s._ref_logits is not None:
        return s._ref_logits
    if not torch_available():
        return None
    import torch

    from .peers import build_hf_model

    model = build_hf_model(s.config, params=s.peer_params(), dtype="float32", device="cpu")
    ids = check_prompt(s)
    with torch.inference_mode():
        s._ref_logits = model(torch.tensor([ids.tolist()])).logits[0, -1].float().numpy()
    del model
    return s._ref_logits


def check_prompt(s: Setup) -> np.ndarray:
    """The fixed short prompt the pre-timing check runs."""
    rng = np.random.default_rng(s.seed + 12345)
    return rng.integers(0, s.config.vocab_size, CHECK_PROMPT_LEN)


def check_logits(actual: np.ndarray, expected: np.ndarray, *, dtype: str) -> dict[str, Any]:
    """Compare logits: ``rel_err = max|a - e| / max|e|`` against :data:`CHECK_RTOL`.

    Returns
    -------
    dict
        ``{"rel_err", "rtol", "ok"}``.
    """
    actual = np.asarray(actual, np.float64).reshape(-1)
    expected = np.asarray(expected, np.float64).reshape(-1)
    if actual.shape != expected.shape:
        return {"rel_err": None, "rtol": CHECK_RTOL.get(dtype, 3e-2), "ok": False,
                "error": f"shape {actual.shape} vs {expected.shape}"}
    denom = max(float(np.abs(expected).max()), 1e-12)
    err = float(np.abs(actual - expected).max()) / denom
    if not np.isfinite(err):
        err = float("inf")
    rtol = CHECK_RTOL.get(dtype, 3e-2)
    return {"rel_err": err, "rtol": rtol, "ok": bool(err <= rtol)}


def open_tvm_variant(s: Setup, variant: str, *, cuda_graph: bool, cache_dir, max_batch: int, max_tokens: int,
                     check: bool, untuned_logits: np.ndarray | None, log) -> tuple[Any, dict[str, Any], np.ndarray]:
    """Build-or-load the engine of ``untuned``/``tuned`` and run the pre-timing check.

    Returns
    -------
    (engine, build_info, check_logits)

    Raises
    ------
    RuntimeError
        The check failed (message names the error and the tolerance).
    """
    db = s.database if variant == "tuned" else None
    t0 = time.perf_counter()
    built = load_engine(config=s.config, quantization=s.quantization, device=s.device.name, target=s.target,
                        params_fp32=s.params_fp32, database=db, cuda_graph=cuda_graph, cache_dir=cache_dir,
                        max_batch_size=max(max_batch, 1),
                        max_total_seq_len=max(max_tokens, s.config.context_window_size))
    info = dict(built.info)
    log(f"{variant}: library {'from cache' if info['cache_hit'] else 'built'} "
        f"({info['build_s']:.1f} s build, {time.perf_counter() - t0:.1f} s total) {info['library']}")
    engine = built.engine
    seq = engine.add_sequence()
    try:
        logits = np.asarray(engine.prefill(seq, check_prompt(s)), np.float32)
    finally:
        engine.remove_sequence(seq)
    if check:
        ref = reference_logits(s)
        ref_name = "hf-fp32-cpu"
        if ref is None and untuned_logits is not None and variant == "tuned":
            ref, ref_name = untuned_logits, "untuned"
        if ref is not None:
            res = check_logits(logits, ref, dtype=s.dtype)
            res["reference"] = ref_name
            info["check"] = res
            if not res["ok"]:
                raise RuntimeError(f"{variant} logits differ from the {ref_name} reference: "
                                   f"rel err {res['rel_err']:.3g} > {res['rtol']:.0e}")
        else:
            info["check"] = {"skipped": "no reference (torch not importable)"}
    return engine, info, logits


def release(obj) -> None:
    """Drop a runner/engine/model and free device memory now (before the next variant loads)."""
    del obj
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------
# Measurement loops
# ---------------------------------------------------------------------------------------------
def measure_decode(runner, *, timer: Timer, batch: int, prompt_len: int, gen_len: int, repeats: int,
                   warmup: int) -> dict[str, Any]:
    """Time ``gen_len`` decode steps of ``batch`` sequences after a ``prompt_len`` prefill.

    One *run* = ``runner.start`` (prefill, untimed) + ``gen_len`` timed steps + ``runner.stop``.
    ``warmup`` runs are discarded, then ``repeats`` runs are kept. Each step's wall time is
    taken with device synchronisation; on CUDA with torch every kept run is repeated once more
    to take each step's GPU time with events (host gaps excluded, see ``bench.timing``).

    Returns
    -------
    dict
        ``tok_s`` / ``ms`` / ``gpu_ms`` statistics over runs (per-run tokens/s and mean step
        time), raw ``samples`` (every step's wall/GPU ms, every run's tokens/s), ``gpu_blocked``
        (fraction of GPU samples whose launch gaps were excluded).
    """
    if repeats < 1 or warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    wall_all: list[float] = []
    gpu_all: list[float] = []
    run_ms: list[float] = []
    run_gpu_ms: list[float] = []
    run_tok_s: list[float] = []
    blocked = []
    for r in range(warmup + repeats):
        runner.start(batch=batch, prompt_len=prompt_len, gen_len=gen_len)
        try:
            steps = [timer.wall(runner.step) for _ in range(gen_len)]
        finally:
            runner.stop()
        if r < warmup:
            continue
        wall_all.extend(steps)
        run_ms.append(float(np.mean(steps)))
        run_tok_s.append(batch * gen_len / (sum(steps) / 1e3))
        if timer.method == "cuda-events":
            runner.start(batch=batch, prompt_len=prompt_len, gen_len=gen_len)
            try:
                g = [timer.gpu(runner.step) for _ in range(gen_len)]
            finally:
                runner.stop()
            gpu_all.extend(x for x, _ in g)
            blocked.extend(b for _, b in g)
            run_gpu_ms.append(float(np.mean([x for x, _ in g])))
    return {
        "tok_s": stats(run_tok_s),
        "ms": stats(run_ms),
        "gpu_ms": stats(run_gpu_ms) if run_gpu_ms else None,
        "samples": {"wall_ms": wall_all, "gpu_ms": gpu_all or None, "tok_s": run_tok_s},
        "gpu_blocked": (sum(bool(b) for b in blocked) / len(blocked)) if blocked else None,
    }


def measure_prefill(runner, *, timer: Timer, batch: int, seq_len: int, repeats: int,
                    warmup: int) -> dict[str, Any]:
    """Time the prefill of ``batch`` fresh sequences of ``seq_len`` tokens.

    Each sample: ``runner.prepare`` (untimed) + timed ``runner.run`` + ``runner.cleanup``.
    ``warmup`` discarded samples first. On CUDA with torch a second pass takes GPU time.

    Returns
    -------
    dict
        Like :func:`measure_decode`; ``ms`` is per prefill of the whole batch.
    """
    if repeats < 1 or warmup < 0:
        raise BenchError("--repeats must be >= 1 and --warmup >= 0")
    wall, gpu, blocked = [], [], []
    for r in range(warmup + repeats):
        runner.prepare(batch=batch, seq_len=seq_len)
        try:
            ms = timer.wall(runner.run)
        finally:
            runner.cleanup()
        if r >= warmup:
            wall.append(ms)
    if timer.method == "cuda-events":
        for _ in range(repeats):
            runner.prepare(batch=batch, seq_len=seq_len)
            try:
                g, b = timer.gpu(runner.run)
            finally:
                runner.cleanup()
            gpu.append(g)
            blocked.append(b)
    tok = [batch * seq_len / (w / 1e3) for w in wall]
    return {
        "tok_s": stats(tok),
        "ms": stats(wall),
        "gpu_ms": stats(gpu) if gpu else None,
        "samples": {"wall_ms": wall, "gpu_ms": gpu or None, "tok_s": tok},
        "gpu_blocked": (sum(bool(b) for b in blocked) / len(blocked)) if blocked else None,
    }


def pct(value: float | None, peak: float | None) -> float | None:
    """``100 * value / peak`` or ``None`` when either is unknown."""
    if value is None or not peak:
        return None
    return 100.0 * value / peak


def prefill_flops(config, *, batch: int, seq_len: int, logits_per_seq: int = 1) -> float:
    """Model FLOPs of prefilling ``batch`` sequences of ``seq_len`` tokens.

    Matmuls only (2 FLOPs per multiply-add): per token and layer ``2 (3d^2 + d^2 + 2 d n_inner)``;
    causal attention per sequence and layer ``2 d S (S + 1)`` (QK^T and PV over the lower
    triangle); the LM head ``2 d V`` for each position whose logits are computed (the last).
    LayerNorm, GELU and softmax are ignored (< 1% at GPT-2 sizes).
    """
    d, inner, n_layer = config.n_embd, config.n_inner, config.n_layer
    linear = 2.0 * (3 * d * d + d * d + 2 * d * inner)
    attn = 2.0 * d * seq_len * (seq_len + 1)
    head = 2.0 * d * config.vocab_size * logits_per_seq
    return float(batch * (n_layer * (seq_len * linear + attn) + head))


def decode_bytes(*, weight_bytes: int, kv_bytes_per_token: int, batch: int, prompt_len: int, gen_len: int) -> float:
    """Bytes read per decode step: all weights once plus every sequence's KV cache.

    The cached context grows from ``prompt_len + 1`` to ``prompt_len + gen_len`` tokens over the
    run; its mean ``prompt_len + (gen_len + 1) / 2`` is used. Activations and KV writes
    (a few KB) are ignored.
    """
    mean_ctx = prompt_len + (gen_len + 1) / 2.0
    return float(weight_bytes + batch * kv_bytes_per_token * mean_ctx)


# ---------------------------------------------------------------------------------------------
# Driver shared by decode and prefill
# ---------------------------------------------------------------------------------------------
def open_runner(s: Setup, variant: str, *, phase: str, cuda_graph: bool, cache_dir, max_batch: int,
                max_tokens: int, check: bool, state: dict, log) -> tuple[Any, dict[str, Any] | None]:
    """Runner (decode or prefill) of one variant plus its build record.

    ``state`` carries the untuned check logits to the tuned variant when there is no torch
    reference. Raises when the variant cannot run here.
    """
    if variant in TORCH_VARIANTS:
        from .peers import TorchDecodeRunner, TorchPrefillRunner, build_hf_model, compile_mode

        if s.device.kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("this torch build has no CUDA")
        model = build_hf_model(s.config, params=s.peer_params(), dtype=s.dtype, device=s.device.name)
        cls = TorchDecodeRunner if phase == "decode" else TorchPrefillRunner
        runner = cls(model, device=s.device.name, compiled=variant == "torch-compile", seed=s.seed,
                     cuda_graph=cuda_graph)
        info = {"torch_compile_mode": (compile_mode(device=s.device.name, cuda_graph=cuda_graph) or "default")
                if variant == "torch-compile" else None,
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}
        return runner, info
    from .runners import TvmDecodeRunner, TvmPrefillRunner

    engine, info, logits = open_tvm_variant(s, variant, cuda_graph=cuda_graph, cache_dir=cache_dir,
                                            max_batch=max_batch, max_tokens=max_tokens, check=check,
                                            untuned_logits=state.get("untuned_logits"), log=log)
    if variant == "untuned":
        state["untuned_logits"] = logits
    cls = TvmDecodeRunner if phase == "decode" else TvmPrefillRunner
    return cls(engine, variant=variant, seed=s.seed), info


def _run_variant(s: Setup, variant: str, *, phase: str, points: list[dict], measure, figures, opts: dict,
                 state: dict, log) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if variant in TORCH_VARIANTS and not torch_available():
        return [error_row(s, status="skipped", error="torch/transformers not importable", variant=variant, **p)
                for p in points]
    try:
        runner, info = open_runner(s, variant, phase=phase, state=state, log=log, **opts)
    except Exception as e:  # noqa: BLE001 - a variant that cannot run is a row, not a crash
        log(f"{variant}: cannot run: {first_line(e)}")
        return [error_row(s, error=first_line(e), variant=variant, **p) for p in points]
    for p in points:
        label = make_row(s, variant=variant, **p)["test"]
        try:
            m = measure(runner, p)
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing on its first call
            log(f"{variant} {label}: failed: {first_line(e)}")
            rows.append(error_row(s, error=first_line(e), build=info, variant=variant, **p))
            continue
        fig = figures(runner, p, m)
        notes = fig.pop("notes", [])
        if m["gpu_blocked"] is not None and m["gpu_blocked"] < 1.0:
            notes.append(f"GPU time includes host gaps in {100 * (1 - m['gpu_blocked']):.0f}% of samples "
                         "(the call synchronises internally)")
        if variant == "tuned" and info is not None:
            miss = _untuned_shapes(s, p, info.get("buckets") or {})
            if miss:
                notes.append(f"{miss} not among the database's buckets {info.get('buckets')}: the tuned build "
                             "runs the untuned (symbolic-shape) kernels there")
        row = make_row(s, variant=variant, **p, tok_s=m["tok_s"].to_dict(), ms=m["ms"].to_dict(),
                       gpu_ms=m["gpu_ms"].to_dict() if m["gpu_ms"] else None, samples=m["samples"],
                       build=info, notes=notes, **fig)
        rows.append(row)
        log(f"{variant:>13} {label:>11}"
            + (f" p{p['prompt_len']}" if p.get("prompt_len") else "")
            + f": {m['tok_s'].median:12.1f} tok/s  {m['ms'].median:9.3f} ms"
            + (f"  gpu {m['gpu_ms'].median:.3f} ms" if m["gpu_ms"] else ""))
    return rows


def _untuned_shapes(s: Setup, p: dict, buckets: dict) -> str | None:
    """Which shapes of a test point have no tuned bucket entry point (None when all do)."""
    if p["phase"] == "decode":
        return None if p["batch"] in buckets.get("decode", []) else f"decode batch {p['batch']}"
    chunk = s.config.prefill_chunk_size
    n = p["seq_len"]
    lengths = {chunk} if n >= chunk else set()
    if n % chunk:
        lengths.add(n % chunk)
    missing = sorted(x for x in lengths if x not in buckets.get("prefill", []))
    return f"prefill chunk length(s) {missing}" if missing else None


def drive(s: Setup, *, phase: str, points: list[dict], measure, figures, opts: dict, log) -> list[dict[str, Any]]:
    """Run every variant over every point; one row per (variant, point), failures included.

    Variants run one after the other, each loaded once for all points and released before the
    next loads (device memory), so tuned and untuned are measured in the same process on the
    same device minutes apart.
    """
    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {}
    for v in s.variants:
        rows += _run_variant(s, v, phase=phase, points=points, measure=measure, figures=figures, opts=opts,
                             state=state, log=log)
        release(None)
    return rows


def env_and_peak(dev, *, database, arch: str, dtype: str, peak_bw, peak_tflops, notes: list[str]):
    """The run's environment (NVML / CPU, versions, database) and the roofline used for percentages."""
    env = envmod.collect_env(dev, database=database)
    env["arch"] = arch
    try:
        peak = envmod.resolve_peak(env, dtype=dtype, peak_bw=peak_bw, peak_tflops=peak_tflops)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if peak is None:
        notes.append("no peak figures for this device: % of roofline omitted (set --peak-bw/--peak-tflops)")
    return env, peak
