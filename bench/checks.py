"""Checks before timing: a variant whose logits differ from the reference is an error, not a speedup.

Before a variant is timed, its logits for a short prompt are checked against a reference
(Hugging Face ``GPT2LMHeadModel`` in fp32 on CPU when torch is importable, else the untuned
engine), so a fast but wrong build is reported as an error instead of a speedup.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np

from .build import load_engine
from .peers import torch_available

__all__ = ["CHECK_PROMPT_LEN", "CHECK_RTOL", "check_prompt", "reference_logits", "check_logits",
           "check_variant", "open_tvm_variant", "release", "first_line"]

CHECK_PROMPT_LEN = 8
#: max |tvm - ref| / max |ref| allowed by the pre-timing check, per activation dtype
CHECK_RTOL = {"float32": 1e-3, "float16": 3e-2}


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (TVM errors carry long tracebacks)."""
    msg = str(exc).strip().splitlines()
    text = next((m for m in msg if m.strip() and not m.startswith("Traceback")), "") if msg else ""
    return f"{type(exc).__name__}: {text}".strip().rstrip(":")


def check_prompt(s) -> np.ndarray:
    """The fixed short prompt the pre-timing check runs."""
    rng = np.random.default_rng(s.seed + 12345)
    return rng.integers(0, s.config.vocab_size, CHECK_PROMPT_LEN)


def reference_logits(s) -> np.ndarray | None:
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


def check_logits(actual: np.ndarray, expected: np.ndarray, *, dtype: str) -> dict[str, Any]:
    """Compare logits: ``rel_err = max|a - e| / max|e|`` against :data:`CHECK_RTOL`.

    Returns
    -------
    dict
        ``{"rel_err", "rtol", "ok"}`` (plus ``error`` on a shape mismatch).
    """
    actual = np.asarray(actual, np.float64).reshape(-1)
    expected = np.asarray(expected, np.float64).reshape(-1)
    rtol = CHECK_RTOL.get(dtype, 3e-2)
    if actual.shape != expected.shape:
        return {"rel_err": None, "rtol": rtol, "ok": False, "error": f"shape {actual.shape} vs {expected.shape}"}
    denom = max(float(np.abs(expected).max()), 1e-12)
    err = float(np.abs(actual - expected).max()) / denom
    if not np.isfinite(err):
        err = float("inf")
    return {"rel_err": err, "rtol": rtol, "ok": bool(err <= rtol)}


def check_variant(s, variant: str, logits: np.ndarray, *, fallback: np.ndarray | None = None) -> dict[str, Any]:
    """Check a variant's check-prompt logits against HF fp32 (or ``fallback`` without torch).

    Raises
    ------
    RuntimeError
        The logits differ (message names the error and the tolerance).
    """
    ref, ref_name = reference_logits(s), "hf-fp32-cpu"
    if ref is None and fallback is not None:
        ref, ref_name = fallback, "untuned"
    if ref is None:
        return {"skipped": "no reference (torch not importable)"}
    res = check_logits(logits, ref, dtype=s.dtype)
    res["reference"] = ref_name
    if not res["ok"]:
        err = res["rel_err"] if res["rel_err"] is not None else float("nan")
        raise RuntimeError(f"{variant} logits differ from the {ref_name} reference: "
                           f"rel err {err:.3g} > {res['rtol']:.0e}")
    return res


def _cuda_binaries(parts: dict) -> str:
    """How the library's CUDA code came to the load (gpt2_model.cuda_binary): precompiled, or compiled then."""
    if parts.get("cubins") or parts.get("compiled"):
        return f"; CUDA sources: {parts.get('cubins', 0)} precompiled, {parts.get('compiled', 0)} compiled at load"
    return ""


def open_tvm_variant(s, variant: str, *, cuda_graph: bool, cache_dir, max_batch: int, max_tokens: int,
                     check: bool, untuned_logits: np.ndarray | None, log) -> tuple[Any, dict[str, Any], np.ndarray]:
    """Build-or-load the engine of ``untuned``/``tuned`` and run the pre-timing check.

    Returns
    -------
    (engine, build_info, check_logits)

    Raises
    ------
    RuntimeError
        The check failed.
    """
    db = s.database if variant == "tuned" else None
    t0 = time.perf_counter()
    built = load_engine(config=s.config, quantization=s.quantization, device=s.device.name, target=s.target,
                        params_fp32=s.params_fp32, database=db, cuda_graph=cuda_graph, cache_dir=cache_dir,
                        max_batch_size=max(max_batch, 1),
                        max_total_seq_len=max(max_tokens, s.config.context_window_size))
    info = dict(built.info)
    log(f"{variant}: library {'from cache' if info['cache_hit'] else 'built'} "
        f"({info['build_s']:.1f} s build, {time.perf_counter() - t0:.1f} s total; load: "
        + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in info.get("load_parts", {}).items() if k.endswith("_s"))
        + _cuda_binaries(info.get("load_parts", {})) + f") {info['library']}")
    engine = built.engine
    seq = engine.add_sequence()
    try:
        logits = np.asarray(engine.prefill(seq, check_prompt(s)), np.float32)
    finally:
        engine.remove_sequence(seq)
    if check:
        info["check"] = check_variant(s, variant, logits, fallback=untuned_logits if variant == "tuned" else None)
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
