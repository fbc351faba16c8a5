"""Every kernel of a step where it runs: the last step's whole-step CUDA graph replayed under
``torch.profiler`` (CUPTI records each kernel node of a graph launch with its own start and end).

:mod:`bench.anatomy` times the partition's kernels one by one; the paged KV cache's own kernels
(attention, KV append, the q/k/v split) are not in the partition, so their time lands in the
step's overhead. Here the step's graph itself is replayed and each kernel's device time read back,
the KV cache's included, so a step splits into

- ``ms``: the sum of its kernels' device times (per replay),
- ``kv_ms``: the part of that in the KV cache's kernels (names matching :data:`KV_CACHE_KERNELS`),
- ``graph_ms - ms``: what the graph spends between kernels (launch and dependency gaps).

Only where the runner has whole-step graphs and torch sees CUDA; anything else is ``None``, and a
failure is logged and gives ``None``: it never costs the row.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from typing import Any

__all__ = ["KV_CACHE_KERNELS", "graph_kernels", "summarize"]

logger = logging.getLogger(__name__)

#: The paged KV cache's kernels (TVM's prebuilt ones and this project's templates that replace them).
KV_CACHE_KERNELS = re.compile(r"batch_decode_paged_kv|batch_prefill|kv_cache|rope|merge_state|copy_single_page"
                              r"|compact_kv|attention")
REPLAYS = 10


def summarize(events: list[tuple[str, float]], replays: int, *, top: int = 12) -> dict[str, Any] | None:
    """``{ms, kv_ms, launches, kernels: [{kernel, calls, us}]}`` per replay from ``(name, µs)`` kernel
    records of ``replays`` replays (None when there are none)."""
    if not events or replays < 1:
        return None
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, us in events:
        rows[name][0] += 1
        rows[name][1] += us
    table = sorted(({"kernel": k, "calls": c / replays, "us": u / replays} for k, (c, u) in rows.items()),
                   key=lambda r: -r["us"])
    total = sum(r["us"] for r in table)
    kv = sum(r["us"] for r in table if KV_CACHE_KERNELS.search(r["kernel"]))
    return {"ms": total / 1e3, "kv_ms": kv / 1e3, "launches": sum(r["calls"] for r in table),
            "replays": replays, "method": "torch.profiler (CUPTI) over the whole-step graph's replays",
            "kernels": table[:top]}


def graph_kernels(runner, *, replays: int = REPLAYS) -> dict[str, Any] | None:
    """The kernels of ``runner``'s last whole-step graph (see the module doc), or None."""
    if getattr(runner, "replay_ms", None) is None:
        return None
    try:
        import torch  # pylint: disable=import-outside-toplevel
        from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available() or runner.replay_ms(n=3, warmup=1) is None:
            return None
        os.environ.setdefault("TEARDOWN_CUPTI", "1")  # finalize CUPTI after the profile (CUDA >= 12.6)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.replay_ms(n=replays, warmup=0)
        events = []
        for evt in prof.events():
            if str(getattr(evt, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            dur = getattr(evt, "device_time", None)
            events.append((evt.name, float(dur if dur is not None else getattr(evt, "cuda_time", 0.0))))
        return summarize(events, replays)
    except Exception as e:  # noqa: BLE001 - a diagnostic, not the measurement
        logger.warning("profiling the step's graph failed: %s", str(e).splitlines()[0] if str(e) else repr(e))
        return None
