"""The files of a tuning database directory, below :class:`tuning.database.TunedDatabase`.

Layout of one directory::

    database_workload.json        MetaSchedule JSON database: one workload per line
    database_tuning_record.json   one tuning record per line: [workload index, record]
    meta.json                     how and for what the records were made (identity fields)
    untuned.json                  untuned kernel time per task (what users get without tuning)
    attention.json                the KV cache's tuned prefill attention choice (tuning.attention)
    norm_gemv.json                the fused layer norm + decode GEMV choices (tuning.norm_gemv_tune)
    wgmma_gemm.json               the Hopper wgmma prefill GEMM choices (tuning.wgmma_tune)
    *.quarantine                  lines moved out by a writer (``tune``) or ``tune --repair``
    .tune.lock                    held (flock) while ``tune`` writes the directory

This module reads and writes these files and checks every line (:func:`parse_database`); it
never decides whether a bad line is moved out: that is :class:`~tuning.database.TunedDatabase`'s
call (only a writer quarantines).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pynvml
import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Trace
from tvm.target import Target

from .intrinsics import preload_tensor_intrinsics
from .targets import arch_of, detect_cpu

logger = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "meta.json"
UNTUNED_FILE = "untuned.json"
ATTENTION_FILE = "attention.json"
NORM_GEMV_FILE = "norm_gemv.json"
WGMMA_GEMM_FILE = "wgmma_gemm.json"
LOCK_FILE = ".tune.lock"
QUARANTINE_SUFFIX = ".quarantine"

# MetaSchedule stores a failed build/run as run_secs == [1e10]; anything at or above 1e9 s is one.
_FAILED_RUN_SECS = 1e9


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    The file gets the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask),
    not ``mkstemp``'s 0600: committed database files must be readable by the other users of a
    checkout.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(file: Path, default: Any = None) -> Any:
    """A JSON file's content, ``default`` if it does not exist.

    Raises
    ------
    ValueError
        The file exists but is not valid JSON (the message names the file).
    """
    if not file.is_file():
        return default
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


# --------------------------------------------------------------------------------------------
# meta.json
# --------------------------------------------------------------------------------------------


def _to_py(obj: Any) -> Any:
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "items"):
        return {str(k): _to_py(v) for k, v in obj.items()}
    if hasattr(obj, "__iter__"):
        return [_to_py(v) for v in obj]
    return str(obj)


def target_json(target: Target | dict) -> dict:
    """A target as a plain JSON dict (``Target(d)`` rebuilds it)."""
    return _to_py(target if isinstance(target, dict) else target.export())


def describe_device(target: Target) -> dict:
    """What the records will be measured on, as far as this host can tell.

    For CUDA: GPU 0's name, driver and compute capability through NVML (``None`` values without
    a local GPU, e.g. when measuring over RPC). For CPU: :func:`tuning.targets.detect_cpu`.
    """
    if arch_of(target) == "cpu":
        return {"cpu": detect_cpu()}
    info: dict[str, Any] = {"gpu_name": None, "driver_version": None}
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["gpu_name"] = name.decode() if isinstance(name, bytes) else name
            info["driver_version"] = driver.decode() if isinstance(driver, bytes) else driver
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            info["compute_capability"] = f"{major}.{minor}"
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # no NVML / no GPU here
        info["note"] = f"no local GPU via NVML ({type(err).__name__})"
    return info


def read_meta(path: str | os.PathLike) -> dict | None:
    """``meta.json`` of a database directory; ``None`` if there is none.

    Raises
    ------
    ValueError
        If ``meta.json`` exists but is not a JSON object.
    """
    file = Path(path) / META_FILE
    meta = read_json(file)
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return meta


def write_meta(path: str | os.PathLike, *, target: Target | dict | None = None, **fields) -> dict:
    """Write (or update) ``meta.json`` in a database directory, atomically.

    Existing fields are kept unless given again. Versions, date, target, arch and device are
    filled in automatically; the caller adds the model fields (``model``, ``config_hash``,
    ``quantization``, ``buckets``, ``trials``, ...).

    Parameters
    ----------
    path : path
        The database directory.
    target : tvm.target.Target or dict, optional
        The target the records are for; required when no ``meta.json`` exists yet.
    **fields
        Any JSON-able fields.

    Returns
    -------
    dict
        The meta data as written.
    """
    path = Path(path)
    meta = read_meta(path) or {}
    if target is None and "target" not in meta:
        raise ValueError("write_meta needs a target for a new database")
    if target is not None:
        meta["target"] = target_json(target)
        meta["arch"] = arch_of(target)
        if "device" not in fields and "device" not in meta:
            meta["device"] = describe_device(target if isinstance(target, Target) else Target(target))
    meta["tvm_version"] = tvm.__version__
    meta["tvm_ffi_version"] = tvm_ffi.__version__
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta.update(fields)
    atomic_write_text(path / META_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str))
    return meta


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def is_failed_run(run_secs) -> bool:
    """True for a record without a usable measurement (MetaSchedule stores failures as 1e10 s)."""
    if run_secs is None or len(run_secs) == 0:
        return True
    return any(float(s) >= _FAILED_RUN_SECS for s in run_secs)


def record_latency_s(record: ms.database.TuningRecord) -> float:
    """Mean measured seconds of a record (``inf`` for a failed one)."""
    secs = None if record.run_secs is None else [float(s) for s in record.run_secs]
    if is_failed_run(secs):
        return float("inf")
    return sum(secs) / len(secs)


@dataclasses.dataclass
class BadLine:
    """A line of a database file that does not parse or does not fit its workload."""

    file: Path
    lineno: int
    line: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file.name} line {self.lineno}: {self.reason}"


@dataclasses.dataclass
class Parsed:
    """Both files of a database, good lines only; records re-indexed onto the good workloads."""

    workload_lines: list[str]
    workloads: list[Any]  # ms.database.Workload, aligned with workload_lines
    record_lines: list[str]
    records: list[tuple[int, list]]  # (workload index, record JSON)
    bad: list[BadLine]
    needs_rewrite: bool  # bad or blank lines, a missing final newline, or shifted indices


def _read_lines(file: Path) -> list[str]:
    if not file.exists():
        return []
    with open(file, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def _ends_with_newline(file: Path) -> bool:
    with open(file, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _explain(err: Exception) -> str:
    lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()]
    text = next((x for x in reversed(lines) if "Error" in x and "(not rendered)" not in x), None)
    text = text or (lines[-1] if lines else "")
    return f"{type(err).__name__}: {text[:200]}"


def _trace_error(record_json: list, workload) -> str:
    """Why a record's trace does not replay on its workload, rendered in detail (TVM's own
    ``TuningRecord.from_json`` replays with rendering off: "ScheduleError: (not rendered)")."""
    try:
        sch = Schedule(workload.mod, error_render_level="detail")
        Trace.apply_json_to_schedule(record_json[0], sch)
    except Exception as err:  # pylint: disable=broad-except
        return "trace does not replay on its workload: " + _explain(err)
    return "record does not deserialize"


def _args_json(workload) -> list:
    func = workload.mod["main"]
    return _to_py([a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(func)])


def parse_database(path: str | os.PathLike) -> Parsed:
    """Parse and check both files of the database at ``path``; nothing is written.

    A workload line must deserialize and its structural hash must match the stored one
    (MetaSchedule checks this in ``Workload.from_json``). A record line must name a good
    workload, its argument shapes/dtypes must be that workload's (an index pointing at the wrong
    workload is caught here), and its trace must replay on it.
    """
    # Tensor-core traces name intrinsics (wmma_load_..._shared_dyn) registered by importing
    # tvm.s_tir.tensor_intrin: without them a valid record does not parse.
    preload_tensor_intrinsics()
    # ... and the mma space's own intrinsics (its records name them: without them its records do not
    # replay in a process that only compiles or validates, and compile falls back to untuned kernels)
    from .spaces.gemm_mma import _register_intrinsics  # pylint: disable=import-outside-toplevel

    _register_intrinsics()
    path = Path(path)
    wfile, rfile = path / WORKLOAD_FILE, path / RECORD_FILE
    wl_lines, workloads, remap, bad = [], [], {}, []
    raw_w = _read_lines(wfile)
    old_idx = 0
    for lineno, line in enumerate(raw_w, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not (isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str) for x in obj)):
                raise ValueError("not a [hash, module] pair")
            workload = ms.database.Workload.from_json(obj)
            # MetaSchedule looks a workload up by this hash but does not check it on load
            have = str(tvm_ffi.structural_hash(workload.mod))
            if have != obj[0]:
                raise ValueError(f"structural hash mismatch: the line says {obj[0]}, its module hashes to {have} "
                                 "(edited by hand, or written by another TVM version)")
        except Exception as err:  # json or TVM deserialization error, hash mismatch
            bad.append(BadLine(wfile, lineno, line, str(err) if isinstance(err, ValueError) else _explain(err)))
            old_idx += 1
            continue
        remap[old_idx] = len(workloads)
        old_idx += 1
        wl_lines.append(line)
        workloads.append(workload)
    args_of: dict[int, list] = {}
    rec_lines, records, shifted = [], [], False
    raw_r = _read_lines(rfile)
    for lineno, line in enumerate(raw_r, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)
                    and isinstance(obj[1], list) and len(obj[1]) == 4):
                raise ValueError("not a [workload index, record] pair")
            if obj[0] not in remap:
                raise ValueError(f"workload index {obj[0]} has no valid workload")
            new_idx = remap[obj[0]]
            workload = workloads[new_idx]
            if new_idx not in args_of:
                args_of[new_idx] = _args_json(workload)
            if _to_py(obj[1][3]) != args_of[new_idx]:
                raise ValueError(f"workload index {obj[0]} points at a workload with other arguments "
                                 f"({args_of[new_idx]}) than the record's ({obj[1][3]})")
            try:
                ms.database.TuningRecord.from_json(obj[1], workload)
            except Exception as err:  # pylint: disable=broad-except
                raise ValueError(_trace_error(obj[1], workload)) from err
        except Exception as err:  # pylint: disable=broad-except
            reason = str(err) if isinstance(err, ValueError) else _explain(err)
            bad.append(BadLine(rfile, lineno, line, reason))
            continue
        if new_idx != obj[0]:
            line = json.dumps([new_idx, obj[1]], separators=(",", ":"))
            shifted = True
        rec_lines.append(line)
        records.append((new_idx, obj[1]))
    needs = bool(bad) or shifted or any(not x.strip() for x in raw_w + raw_r)
    needs = needs or bool(raw_w and not _ends_with_newline(wfile)) or bool(raw_r and not _ends_with_newline(rfile))
    return Parsed(wl_lines, workloads, rec_lines, records, bad, needs)


def quarantine(path: str | os.PathLike, parsed: Parsed) -> None:
    """Move ``parsed``'s bad lines to ``<file>.quarantine`` and rewrite both files with the good
    lines (atomically). Only writers call this: ``tune`` on its work dir, ``tune --repair``."""
    path = Path(path)
    by_file: dict[Path, list[BadLine]] = {}
    for b in parsed.bad:
        by_file.setdefault(b.file, []).append(b)
    for file, bad in by_file.items():
        qfile = file.with_name(file.name + QUARANTINE_SUFFIX)
        with open(qfile, "a", encoding="utf-8") as f:
            for b in bad:
                f.write(b.line.rstrip("\n") + "\n")
        for b in bad:
            logger.warning("%s: line %d quarantined to %s (%s)", file, b.lineno, qfile.name, b.reason)
    if parsed.needs_rewrite:
        atomic_write_text(path / WORKLOAD_FILE, "".join(x + "\n" for x in parsed.workload_lines))
        atomic_write_text(path / RECORD_FILE, "".join(x + "\n" for x in parsed.record_lines))
