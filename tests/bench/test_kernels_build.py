"""``bench kernels`` times the kernel the library runs: its builds use the tuner's and the
library's build config (``tuning.builder.build_config``: ``cp.async`` for the mma.sync space's
software pipelines). A kernel built without it has synchronous copies and measured ~2x slower on
an H200 (2026-12-02: the s1024 MLP down-projection 49 µs vs 24 µs). CPU only: builds, no run."""

from __future__ import annotations

import re

from bench import kernels
from tuning import spaces
from tuning.spaces import workloads as wl
from tuning.targets import make_target


def _source(mod) -> str:
    mod = mod.mod if hasattr(mod, "mod") else mod
    return "\n".join(m.inspect_source() for m in mod.imports) or mod.inspect_source()


def test_bench_kernel_builds_keep_the_async_copy_pipeline():
    target = make_target("sm_90")
    func = wl.linear(1, 128, 768, 768, epilogue="residual")
    cands, stats = spaces.sample_candidates(func, target=target, num=1, seed=3, include_dlight=False,
                                            only=("gemm_mma/",), max_attempts=24)
    assert len(cands) == 1, stats
    src = _source(kernels._compile(None, target=target, scheduled_mod=cands[0].sch.mod))  # pylint: disable=protected-access
    assert "mma.sync.aligned.m16n8k16" in src
    assert re.search(r"cp\.async\.c[ag]\.shared\.global", src), "bench built the kernel without cp.async"


def test_the_attention_row_reads_the_stored_template_of_the_committed_database():
    """The committed sm_90 database stores the tensor-core prefill template (``"template": "tc"``);
    ``bench kernels`` read every stored config as SIMT constants and failed on it
    (``PrefillConfig.__init__() got an unexpected keyword argument 'tile_k'``, H200, 2026-12-02)."""
    import json
    from pathlib import Path

    from gpt2_model.config import get_config
    from tuning.attention import AttentionKey, PrefillConfig, attention_key
    from tuning.attention_tc import TCConfig

    stored = json.loads((Path(__file__).parents[2] / "databases/sm_90/gpt2-q0f16/attention.json").read_text())
    entry = next(e for e in stored["kernels"] if e.get("kernel", "batch_prefill_ragged_kv") == "batch_prefill_ragged_kv")
    key = attention_key(get_config("gpt2"), "float16")
    cfg = kernels.stored_prefill_config(stored, key)
    assert entry["best"]["template"] == "tc" and isinstance(cfg, TCConfig)
    assert cfg == TCConfig(**entry["best"]["config"])
    simt = {"kernels": [{**entry, "best": {"config": {"num_blks": 32, "tile_x": 32, "tile_z": 32, "num_warps": 4,
                                                        "load_vec": 4}}}]}
    assert kernels.stored_prefill_config(simt, key) == PrefillConfig(32, 32, 32, 4, 4)
    other = AttentionKey(h_kv=16, h_q=16, d=64, dtype="float16")
    assert kernels.stored_prefill_config(stored, other) is None
    assert kernels.stored_prefill_config(None, key) is None
