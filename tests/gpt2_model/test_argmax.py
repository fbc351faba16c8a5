"""The device argmax of greedy sampling (``gpt2_model.model``): two stages, per chunk of the row
then per row, against NumPy's argmax (first index of the max), on the CPU; and its kernels get
dlight's reduction schedule for CUDA (a block per row / chunk, not a thread per row)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te

from gpt2_model.model import ARGMAX_CHUNKS, _argmax_merge, _argmax_partial
from tuning.targets import make_target


def _i64(*dims):
    """int64 shapes, as relax gives them to the model's TE functions."""
    return tuple(tvm.tirx.IntImm("int64", d) for d in dims)


def _greedy_func(b: int, vocab: int):
    logits = te.placeholder(_i64(b, 1, vocab), "float32", name="logits")
    return te.create_prim_func([logits, _argmax_merge(logits, _argmax_partial(logits))])


@pytest.mark.parametrize("vocab", [50257, 1001, 40])  # not a multiple of the chunks; fewer values than chunks
def test_first_index_of_the_max_like_numpy(vocab):
    rng = np.random.default_rng(vocab)
    b = 6
    x = rng.standard_normal((b, 1, vocab)).astype(np.float32)
    x[1, 0, [3, vocab - 1]] = 9.0  # a tie across chunks: the first wins
    x[2, 0, [vocab - 2, vocab - 1]] = 9.0  # a tie at the end of the row, in the last (partial) chunk
    x[3, 0, :] = -np.inf  # every value the lowest: index 0
    x[4, 0, :] = np.nan  # NaN counts as the lowest value: a row of NaN gives index 0 (as NumPy)
    x[5, 0, vocab - 1] = 50.0  # the max at the very last index
    x[0, 0, 1] = np.nan  # ...and a NaN beside real values is never the max
    lib = tvm.compile(tvm.IRModule({"main": _greedy_func(b, vocab)}), target="llvm")
    out = tvm.runtime.tensor(np.full(b, -1, np.int32))
    lib["main"](tvm.runtime.tensor(x), out)
    got = out.numpy()
    want = np.argmax(np.where(np.isnan(x[:, 0]), -np.inf, x[:, 0]), axis=1)
    assert got.tolist() == want.tolist()
    assert got[1] == 3 and got[2] == vocab - 2 and got[3] == 0 and got[4] == 0 and got[5] == vocab - 1


def test_cuda_kernels_get_a_block_per_chunk_and_per_row():
    """The two stages as the pipeline sees them (the partition's kernels of a decode b8 step) get
    dlight's reduction schedule: a block per (row, chunk), then a block per row; both build."""
    from gpt2_model.config import get_config  # pylint: disable=import-outside-toplevel
    from tuning.partition import partition  # pylint: disable=import-outside-toplevel
    from tuning.untuned import untuned_schedule  # pylint: disable=import-outside-toplevel

    target = make_target("sm_90")
    tasks = {t.kernel: t for t in partition(get_config("gpt2"), quantization="q0f16", target=target,
                                            buckets={"decode": [8]}) if t.kernel.startswith("argmax")}
    assert len(tasks) == 2, sorted(tasks)
    expect = {"argmax_partial": 8 * ARGMAX_CHUNKS, "argmax": 8}
    for name, task in tasks.items():
        sch = untuned_schedule(task.mod(), target=target)
        assert sch is not None, name
        text = sch.mod["main"].script()
        blocks = [int(e) for e in re.findall(r'thread_binding\((?:T\.int64\()?(\d+)\)?, thread="blockIdx.x"\)', text)]
        stage = "argmax_partial" if "partial" in name else "argmax"
        assert blocks and blocks[0] == expect[stage], (name, blocks)
        assert 'thread="threadIdx.x"' in text
        with target:
            tvm.compile(sch.mod, target=target)
