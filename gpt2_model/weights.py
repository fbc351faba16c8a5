"""Converted weights on disk: raw parameter shards plus a tensor-cache JSON (MLC-LLM's layout).

``DIST/params_shard_{i}.bin`` hold the raw bytes of consecutive parameters; ``DIST/tensor-cache.json``
lists, per shard, each record's name, shape, dtype, byte offset and size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

CACHE_FILE = "tensor-cache.json"
DEFAULT_SHARD_BYTES = 32 * 1024 * 1024


class WeightsError(ValueError):
    """Missing, truncated or inconsistent converted weights."""


def save_params(params: dict[str, np.ndarray], out_dir: str | Path, *, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``params`` (in order) as shards + ``tensor-cache.json``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    current: list[tuple[str, np.ndarray]] = []
    size = 0

    def flush():
        nonlocal current, size
        if not current:
            return
        path = out_dir / f"params_shard_{len(shards)}.bin"
        records, offset = [], 0
        with open(path, "wb") as f:
            for name, arr in current:
                data = np.ascontiguousarray(arr).tobytes()
                f.write(data)
                records.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                                "format": "raw", "nbytes": len(data), "byteOffset": offset})
                offset += len(data)
        shards.append({"dataPath": path.name, "format": "raw-shard", "nbytes": offset, "records": records})
        current, size = [], 0

    for name, arr in params.items():
        if current and size + arr.nbytes > shard_bytes:
            flush()
        current.append((name, arr))
        size += arr.nbytes
    flush()
    total = sum(s["nbytes"] for s in shards)
    meta = {"ParamSize": len(params), "ParamBytes": total}
    tmp = out_dir / (CACHE_FILE + ".tmp")
    tmp.write_text(json.dumps({"metadata": meta, "records": shards}, indent=1))
    os.replace(tmp, out_dir / CACHE_FILE)
    return out_dir / CACHE_FILE


def load_params(dist_dir: str | Path) -> dict[str, np.ndarray]:
    """Read what :func:`save_params` wrote; every size is checked."""
    dist_dir = Path(dist_dir)
    index = dist_dir / CACHE_FILE
    if not index.is_file():
        raise WeightsError(f"no {CACHE_FILE} in {dist_dir}: run `gpt2k convert-weight` first")
    try:
        shards = json.loads(index.read_text())["records"]
    except (json.JSONDecodeError, KeyError) as err:
        raise WeightsError(f"{index} is corrupt: {err}") from err
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        path = dist_dir / shard["dataPath"]
        if not path.is_file():
            raise WeightsError(f"missing weight shard {path}")
        blob = path.read_bytes()
        if len(blob) != shard["nbytes"]:
            raise WeightsError(f"weight shard {path} has {len(blob)} bytes, expected {shard['nbytes']} (truncated?)")
        for rec in shard["records"]:
            start, end = rec["byteOffset"], rec["byteOffset"] + rec["nbytes"]
            arr = np.frombuffer(blob[start:end], dtype=rec["dtype"]).reshape(rec["shape"])
            out[rec["name"]] = arr.copy()
    return out
