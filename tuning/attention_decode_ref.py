"""The decode attention template's NumPy reference, test inputs and measured cases
(:mod:`tuning.attention_decode` re-exports every name here).

Layout and semantics as TVM's ``batch_decode_paged_kv``: pages ``[num_pages, 2, h_kv, 16, d]`` (K then
V), a sequence's pages in order from its page-table row, the last one filled to its last-page length;
a sequence without pages has output 0 and ``lse = -5e4`` (TVM's initial softmax max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DECODE_LSE_ATOL", "DECODE_OUT_RTOL", "EMPTY_LSE", "MIXED_CASE", "PAGE_SIZE", "DecodeInputs",
           "decode_case_name", "decode_cases", "decode_scalars", "paged_decode_args", "reference_paged_decode"]

PAGE_SIZE = 16
EMPTY_LSE = -5e4  # TVM's initial softmax max: the lse of a sequence without pages
_EMPTY_LSE = EMPTY_LSE


# ------------------------------------------------------------------------------------------------
# NumPy reference and inputs
# ------------------------------------------------------------------------------------------------


def reference_paged_decode(q: np.ndarray, pages: np.ndarray, indptr: np.ndarray, values: np.ndarray,
                           last_page_len: np.ndarray, sm_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(output float32 ``[B, h_q, d]``, base-2 ``lse`` float32 ``[B, h_q]``) of one decode step.

    ``q`` ``[B, h_q, d]``; ``pages`` ``[num_pages, 2, h_kv, 16, d]`` (K then V); sequence ``b``
    owns pages ``values[indptr[b]:indptr[b + 1]]`` in order, the last one filled to
    ``last_page_len[b]``. Computed in float64. A sequence without pages: output 0, ``lse = -5e4``.
    """
    q = np.asarray(q, np.float64)
    pages = np.asarray(pages)
    batch, h_q, d = q.shape
    group = h_q // pages.shape[2]
    ps = pages.shape[3]
    out = np.zeros((batch, h_q, d), np.float64)
    lse = np.full((batch, h_q), _EMPTY_LSE, np.float64)
    for b in range(batch):
        npg = int(indptr[b + 1] - indptr[b])
        if npg == 0:
            continue
        n = (npg - 1) * ps + int(last_page_len[b])
        pos = np.arange(n)
        pid = np.asarray(values)[indptr[b] + pos // ps]
        k = np.repeat(pages[pid, 0, :, pos % ps, :].astype(np.float64), group, axis=1)  # [n, h_q, d]
        v = np.repeat(pages[pid, 1, :, pos % ps, :].astype(np.float64), group, axis=1)
        s = np.einsum("hd,nhd->hn", q[b], k) * sm_scale
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        den = p.sum(axis=1, keepdims=True)
        out[b] = np.einsum("hn,nhd->hd", p / den, v)
        lse[b] = (m[:, 0] + np.log(den[:, 0])) / math.log(2)
    return out.astype(np.float32), lse.astype(np.float32)


def decode_scalars(sm_scale: float) -> tuple:
    """rotary_mode=0 (GPT-2 has learned positions), rope_scale, rope_theta, sm_scale."""
    return (0, 1.0, 10000.0, float(sm_scale))


@dataclass
class DecodeInputs:
    """One decode step's kernel arguments (``args``: the 9 tensors; output at 7, lse at 8) and host data."""

    args: list
    q: np.ndarray
    pages: np.ndarray
    indptr: np.ndarray
    values: np.ndarray
    last_page_len: np.ndarray
    sm_scale: float

    @property
    def scalars(self) -> tuple:
        return decode_scalars(self.sm_scale)

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        return reference_paged_decode(self.q, self.pages, self.indptr, self.values, self.last_page_len, self.sm_scale)


def paged_decode_args(key, ctx_lens: Sequence[int], *, device, seed: int = 0, spare_pages: int = 3,
                      poison: bool = True) -> DecodeInputs:
    """Random paged inputs of a decode step over sequences of ``ctx_lens`` tokens (0: no pages).

    Pages are scattered: the page table is a random permutation of the cache's pages (plus
    ``spare_pages`` unused ones). With ``poison`` the slots no sequence owns (the last pages' tails,
    unused pages) hold NaN, so a kernel that reads them into the result fails the check.
    ``device`` None: host arrays only (``args`` empty).
    """
    rng = np.random.default_rng(seed)
    lens = [int(n) for n in ctx_lens]
    npages = [-(-n // PAGE_SIZE) for n in lens]
    total = sum(npages) + spare_pages
    q = rng.standard_normal((len(lens), key.h_q, key.d)).astype(key.dtype)
    pages = rng.standard_normal((total, 2, key.h_kv, PAGE_SIZE, key.d)).astype(key.dtype)
    values = rng.permutation(total)[: sum(npages)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    last = np.array([n - (p - 1) * PAGE_SIZE if p else 0 for n, p in zip(lens, npages)], np.int32)
    if poison:
        owned = np.zeros((total, PAGE_SIZE), bool)
        for b, n in enumerate(lens):
            pos = np.arange(n)
            owned[values[indptr[b] + pos // PAGE_SIZE], pos % PAGE_SIZE] = True
        pages.transpose(0, 3, 1, 2, 4)[~owned] = np.nan  # a view: (page, slot) first
    args = []
    if device is not None:
        import tvm  # pylint: disable=import-outside-toplevel

        nd = lambda a: tvm.runtime.tensor(a, device)  # noqa: E731
        zeros_b = np.zeros(len(lens), np.int32)
        args = [nd(q), nd(pages), nd(indptr), nd(values if len(values) else np.zeros(1, np.int32)), nd(last),
                nd(zeros_b), nd(zeros_b), nd(np.zeros(q.shape, key.dtype)), nd(np.zeros(q.shape[:2], np.float32))]
    return DecodeInputs(args=args, q=q, pages=pages, indptr=indptr, values=values, last_page_len=last,
                        sm_scale=1.0 / math.sqrt(key.d))


# ------------------------------------------------------------------------------------------------
# Checking and timing a built kernel
# ------------------------------------------------------------------------------------------------

#: Output error bound, relative to the reference's max |output| (fp16 output rounding alone is
#: 2^-11 ~ 4.9e-4 of a value), and the base-2 ``lse`` bound (absolute; ``lse`` ~ log2(context) + max score).
DECODE_OUT_RTOL = {"float16": 2e-3, "float32": 1e-5}
DECODE_LSE_ATOL = 2e-3


def decode_case_name(batch: int, ctx: int) -> str:
    return f"b{batch}_ctx{ctx}"


def decode_cases(batches: Sequence[int], contexts: Sequence[int]) -> dict[str, list[int]]:
    """Timed cases: every sequence of a batch at the same context length."""
    return {decode_case_name(b, n): [n] * b for n in contexts for b in batches}


#: Checked, not timed: 1 token, a full page, one token into a page, a page minus one, no pages, long.
MIXED_CASE = {"mixed": [1, 16, 17, 255, 0, 129, 300]}
