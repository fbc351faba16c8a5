"""Roofline arithmetic: model FLOPs of a prefill, bytes read per decode step, percentages."""

from __future__ import annotations

__all__ = ["pct", "prefill_flops", "decode_bytes", "matmul_tflops"]


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


def matmul_tflops(flops: float, us: float | None) -> float | None:
    """TFLOP/s of ``flops`` done in ``us`` microseconds (``None`` without a time)."""
    if not us:
        return None
    return flops / (us * 1e-6) / 1e12
