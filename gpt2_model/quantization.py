"""Quantization schemes: q0f32, q0f16 (no quantization) and q4f16_1 (4-bit groups of 32).

Each scheme decides two things: the module that holds a weight inside the model (and how the
kernel turns it back into a matrix), and the conversion of an fp32 weight into that stored form.

q4f16_1 (MLC-LLM's name): a row of ``K`` weights is cut into groups of 32 along ``K``; each group
keeps one fp16 scale ``max|w| / 7`` and 32 unsigned 4-bit codes ``round(w / scale) + 7`` in
``[0, 14]``, packed eight to a ``uint32`` (code ``j`` of a word in bits ``4j .. 4j+3``).
Dequantization is ``(code - 7) * scale``. The dequantize step is written in the same tensor
expression as the matmul that reads it, so it is one TIR kernel with the matmul by construction
and the schedulers (dlight, MetaSchedule) inline it into the matmul's loads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

GROUP_SIZE = 32
CODES_PER_WORD = 8  # 4-bit codes per uint32
MAX_CODE = 7  # symmetric: codes 0..14 around 7


class QuantizationError(ValueError):
    """An unknown scheme or a shape the scheme cannot hold."""


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """A quantization scheme (MLC-LLM naming)."""

    name: str
    kind: str  # "none" or "group"
    activation_dtype: str  # dtype of activations and of unquantized params
    group_size: int = 0
    bits: int = 0


QUANTIZATIONS: dict[str, QuantScheme] = {
    "q0f32": QuantScheme("q0f32", "none", "float32"),
    "q0f16": QuantScheme("q0f16", "none", "float16"),
    "q4f16_1": QuantScheme("q4f16_1", "group", "float16", group_size=GROUP_SIZE, bits=4),
}


def get_scheme(name: str) -> QuantScheme:
    """The scheme called ``name``; one clear error for an unknown name."""
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise QuantizationError(
            f"unknown quantization {name!r}; known: {', '.join(QUANTIZATIONS)}"
        ) from None


# ----------------------------------------------------------------------------- kernels (te)
def _dequant_elem(q_weight: te.Tensor, q_scale: te.Tensor, row, k, dtype: str):
    """Element (row, k) of a packed q4 matrix: 4-bit code minus the zero point, times the group scale."""
    word = q_weight[row, k // CODES_PER_WORD]
    shift = (k % CODES_PER_WORD * 4).astype("uint32")
    code = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(15, "uint32"))
    return (code.astype(dtype) - tirx.const(MAX_CODE, dtype)) * q_scale[row, k // GROUP_SIZE]


def _dequant_te(q_weight: te.Tensor, q_scale: te.Tensor, rows, cols: int, dtype: str, name: str):
    """(rows, cols) fp16 matrix from packed codes (rows, cols/8) and scales (rows, cols/32)."""

    return te.compute((rows, cols), lambda i, k: _dequant_elem(q_weight, q_scale, i, k, dtype), name=name)


def _nt_matmul_dequant(x: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor):
    """x (..., K) @ dequant(W)^T with W (N, K): one kernel, dequantize block + matmul block."""
    *lead, k_dim = x.shape
    n_dim = q_scale.shape[0]
    w = _dequant_te(q_weight, q_scale, n_dim, int(k_dim), x.dtype, "dequantize")
    k = te.reduce_axis((0, k_dim), name="k")
    return te.compute(
        (*lead, n_dim),
        lambda *idx: te.sum(x[(*idx[:-1], k)] * w[idx[-1], k], axis=k),
        name="NT_matmul",
    )


def _take_dequant(q_weight: te.Tensor, q_scale: te.Tensor, ids: te.Tensor, cols: int, dtype: str):
    """Embedding rows ``ids`` of a packed table, dequantized: (len(ids), cols)."""

    return te.compute((ids.shape[0], cols), lambda i, k: _dequant_elem(q_weight, q_scale, ids[i], k, dtype),
                      name="take_dequantize")


# ----------------------------------------------------------------------------- modules
class GroupQuantLinear(nn.Module):
    """Linear layer whose weight is stored as q4f16_1 groups; y = x @ dequant(W)^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme):
        _check_groupable(in_features, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.q_weight = nn.Parameter((out_features, in_features // CODES_PER_WORD), "uint32")
        self.q_scale = nn.Parameter((out_features, in_features // GROUP_SIZE), scheme.activation_dtype)
        self.bias = nn.Parameter((out_features,), scheme.activation_dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = op.tensor_expr_op(_nt_matmul_dequant, "dequantize_NT_matmul", [x, self.q_weight, self.q_scale])
        return y + self.bias if self.bias is not None else y


class TiedEmbedding(nn.Module):
    """Token embedding whose table is also the output projection (``lm_head`` tied to ``wte``)."""

    def __init__(self, vocab_size: int, dim: int, dtype: str):
        self.weight = nn.Parameter((vocab_size, dim), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return op.take(self.weight, ids, axis=0)  # (n, dim)

    def lm_head(self, hidden: Tensor) -> Tensor:
        return op.matmul(hidden, op.permute_dims(self.weight))  # (b, s, vocab)


class GroupQuantTiedEmbedding(nn.Module):
    """q4f16_1 token embedding, tied output projection reads the same packed table."""

    def __init__(self, vocab_size: int, dim: int, scheme: QuantScheme):
        _check_groupable(dim, "n_embd")
        self.dim, self.dtype = dim, scheme.activation_dtype
        self.q_weight = nn.Parameter((vocab_size, dim // CODES_PER_WORD), "uint32")
        self.q_scale = nn.Parameter((vocab_size, dim // GROUP_SIZE), scheme.activation_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return op.tensor_expr_op(
            lambda q, s, i: _take_dequant(q, s, i, self.dim, self.dtype),
            "take_dequantize",
            [self.q_weight, self.q_scale, ids],
        )

    def lm_head(self, hidden: Tensor) -> Tensor:
        return op.tensor_expr_op(_nt_matmul_dequant, "dequantize_NT_matmul", [hidden, self.q_weight, self.q_scale])


def _check_groupable(size: int, what: str) -> None:
    if size % GROUP_SIZE != 0:
        raise QuantizationError(
            f"q4f16_1 needs {what} divisible by the group size {GROUP_SIZE}, got {size}"
        )


def make_linear(scheme: QuantScheme, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
    """The linear layer of ``scheme`` (weight stored as (out, in), HF Conv1D transposed)."""
    if scheme.kind == "group":
        return GroupQuantLinear(in_features, out_features, bias, scheme)
    return nn.Linear(in_features, out_features, bias=bias, dtype=scheme.activation_dtype)


def make_embedding(scheme: QuantScheme, vocab_size: int, dim: int) -> nn.Module:
    """The tied token embedding of ``scheme``."""
    if scheme.kind == "group":
        return GroupQuantTiedEmbedding(vocab_size, dim, scheme)
    return TiedEmbedding(vocab_size, dim, scheme.activation_dtype)


# ----------------------------------------------------------------------------- weight conversion
def group_quantize(weight: np.ndarray, *, dtype: str = "float16") -> tuple[np.ndarray, np.ndarray]:
    """Quantize an (N, K) matrix to q4f16_1: packed codes (N, K/8) uint32 and scales (N, K/32)."""
    n, k = weight.shape
    _check_groupable(k, "the last dimension")
    w = weight.astype(np.float32).reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    scale = (np.abs(w).max(axis=-1, keepdims=True) / MAX_CODE).astype(dtype)
    safe = np.where(scale.astype(np.float32) == 0, 1.0, scale.astype(np.float32))
    codes = np.clip(np.rint(w / safe) + MAX_CODE, 0, 2 * MAX_CODE).astype(np.uint32)
    codes = codes.reshape(n, k // CODES_PER_WORD, CODES_PER_WORD)
    shifts = (np.arange(CODES_PER_WORD, dtype=np.uint32) * 4)[None, None, :]
    packed = np.bitwise_or.reduce(codes << shifts, axis=-1).astype(np.uint32)
    return packed, scale.reshape(n, k // GROUP_SIZE)


def group_dequantize(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`group_quantize` (fp32 result), used by tests and references."""
    n, words = packed.shape
    shifts = (np.arange(CODES_PER_WORD, dtype=np.uint32) * 4)[None, None, :]
    codes = (packed[:, :, None] >> shifts) & np.uint32(15)
    codes = codes.reshape(n, words * CODES_PER_WORD).astype(np.float32) - MAX_CODE
    return codes * np.repeat(scale.astype(np.float32), GROUP_SIZE, axis=1)


#: Our parameter names whose stored matrices are quantized under a group scheme.
def _is_quantized_matrix(name: str) -> bool:
    return name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) or name == "transformer.wte.weight"


def convert_params(params: dict[str, np.ndarray], scheme: QuantScheme) -> dict[str, np.ndarray]:
    """fp32 parameters under our (unquantized) names -> the stored form of ``scheme``.

    Under a group scheme ``X.weight`` of a quantized matrix becomes ``X.q_weight`` and ``X.q_scale``.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if scheme.kind == "group" and _is_quantized_matrix(name):
            stem = name[: -len(".weight")]
            out[f"{stem}.q_weight"], out[f"{stem}.q_scale"] = group_quantize(value, dtype=scheme.activation_dtype)
        else:
            out[name] = np.ascontiguousarray(value.astype(scheme.activation_dtype))
    return out


def dequantize_params(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored parameters -> fp32 matrices under unquantized names (the reference's weights)."""
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if name.endswith(".q_weight"):
            stem = name[: -len(".q_weight")]
            out[f"{stem}.weight"] = group_dequantize(value, params[f"{stem}.q_scale"])
        elif not name.endswith(".q_scale"):
            out[name] = value.astype(np.float32)
    return out
