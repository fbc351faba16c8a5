"""Tuning databases on disk: layout, ``meta.json``, integrity, and the pruned committed form.

Layout::

    DATABASE_DIR/ARCH/MODEL-QUANT/            e.g. databases/sm_90/gpt2-q0f16/
    DATABASE_DIR/cpu-<cpu name>/MODEL-QUANT/  e.g. databases/cpu-amd-epyc-9654/gpt2-q0f32/
        database_workload.json       MetaSchedule JSON database: one workload per line
        database_tuning_record.json  one tuning record per line: [workload index, record]
        meta.json                    how and for what the records were made

A JSON database appends one line per record, so a ``kill -9`` mid-tuning leaves at most one
truncated last line. MetaSchedule's ``JSONDatabase`` raises on such a line; :func:`open_database`
moves bad lines into ``<file>.quarantine`` (with a warning) and opens the rest. TVM's record lookup
ignores the target, so :func:`open_database` also refuses a database made for another arch.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .targets import arch_of, detect_cpu, sanitize

__all__ = [
    "META_FILE",
    "RECORD_FILE",
    "WORKLOAD_FILE",
    "DatabaseMismatchError",
    "DatabaseVersionWarning",
    "clean_database",
    "config_hash",
    "database_path",
    "describe_device",
    "is_failed_run",
    "open_database",
    "prune_best",
    "read_meta",
    "record_latency_s",
    "write_meta",
]

logger = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
META_FILE = "meta.json"
QUARANTINE_SUFFIX = ".quarantine"

# MetaSchedule stores a failed build/run as run_secs == [1e10]; anything at or above 1e9 s is one.
_FAILED_RUN_SECS = 1e9


class DatabaseMismatchError(ValueError):
    """The database was made for another architecture (or CPU) than the build target."""


class DatabaseVersionWarning(UserWarning):
    """The database was made with another TVM / tvm-ffi version than the one running."""


# --------------------------------------------------------------------------------------------
# Layout and meta.json
# --------------------------------------------------------------------------------------------


def database_path(
    root: str | os.PathLike,
    *,
    arch: str,
    model: str,
    quantization: str,
    cpu_name: str | None = None,
) -> Path:
    """Directory of the database of one model/quantization on one architecture.

    Parameters
    ----------
    root : path
        The database root (``databases/`` in the repository).
    arch : str
        ``sm_XX``, or ``cpu`` (then the directory is ``cpu-<sanitized cpu name>``).
    model : str
        Model name, e.g. ``gpt2`` or ``gpt2-medium``.
    quantization : str
        Quantization name, e.g. ``q0f16``.
    cpu_name : str, optional
        CPU model name for ``arch == "cpu"``; defaults to this host's (:func:`detect_cpu`).

    Returns
    -------
    pathlib.Path
    """
    if not model or not quantization:
        raise ValueError("database_path needs a model and a quantization name")
    if arch == "cpu":
        top = "cpu-" + sanitize(cpu_name or detect_cpu()["name"])
    else:
        top = arch
    return Path(root) / top / f"{model}-{quantization}"


def config_hash(config: Any) -> str:
    """Short, stable hash of a model configuration (a dataclass or a JSON-able dict).

    Returns
    -------
    str
        The first 16 hex digits of the SHA-256 of the canonical JSON form.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _to_py(obj: Any) -> Any:
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "items"):
        return {str(k): _to_py(v) for k, v in obj.items()}
    if hasattr(obj, "__iter__"):
        return [_to_py(v) for v in obj]
    return str(obj)


def _target_json(target: Target | dict) -> dict:
    """A target as a plain JSON dict (``Target(d)`` rebuilds it)."""
    return _to_py(target if isinstance(target, dict) else target.export())


def describe_device(target: Target) -> dict:
    """What the records will be measured on, as far as this host can tell.

    For CUDA: GPU 0's name, driver and CUDA driver version through NVML (``None`` values without a
    local GPU, e.g. when measuring over RPC: pass the remote GPU's fields to :func:`write_meta`).
    For CPU: :func:`detect_cpu`.
    """
    if arch_of(target) == "cpu":
        return {"cpu": detect_cpu()}
    info: dict[str, Any] = {"gpu_name": None, "driver_version": None}
    try:
        import pynvml

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


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_meta(path: str | os.PathLike, *, target: Target | dict | None = None, **fields) -> dict:
    """Write (or update) ``meta.json`` in a database directory, atomically.

    Existing fields are kept unless given again. Versions, date, target and device are filled in
    automatically; the caller adds the model fields (``model``, ``model_config_hash``,
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
    import tvm_ffi

    path = Path(path)
    meta = read_meta(path) or {}
    if target is None and "target" not in meta:
        raise ValueError("write_meta needs a target for a new database")
    if target is not None:
        meta["target"] = _target_json(target)
        meta["arch"] = arch_of(target)
        if "device" not in fields and "device" not in meta:
            meta["device"] = describe_device(
                target if isinstance(target, Target) else Target(target)
            )
    meta["tvm_version"] = tvm.__version__
    meta["tvm_ffi_version"] = tvm_ffi.__version__
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta.update(fields)
    _atomic_write_text(path / META_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str))
    return meta


def read_meta(path: str | os.PathLike) -> dict | None:
    """Read ``meta.json`` of a database directory; ``None`` if there is none.

    Raises
    ------
    ValueError
        If ``meta.json`` exists but is not a JSON object.
    """
    file = Path(path) / META_FILE
    if not file.exists():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return meta


# --------------------------------------------------------------------------------------------
# Integrity: parse, quarantine, check the target
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
class _Parsed:
    workload_lines: list[str]  # good lines, in order (index = workload id)
    workloads: list[Any]  # ms.database.Workload, aligned with workload_lines
    record_lines: list[str]  # good lines, re-indexed
    records: list[tuple[int, list]]  # (workload id, record JSON)
    quarantined: int


def _quarantine(file: Path, bad: list[tuple[int, str, str]]) -> None:
    qfile = file.with_name(file.name + QUARANTINE_SUFFIX)
    with open(qfile, "a", encoding="utf-8") as f:
        for _, line, _ in bad:
            f.write(line.rstrip("\n") + "\n")
    for lineno, line, reason in bad:
        snippet = line[:60] + ("..." if len(line) > 60 else "")
        msg = f"{file}: line {lineno} quarantined to {qfile.name} ({reason}): {snippet!r}"
        logger.warning(msg)
        warnings.warn(msg, stacklevel=3)


def _read_lines(file: Path) -> list[str]:
    if not file.exists():
        return []
    with open(file, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def _parse_database(path: Path, *, fix: bool) -> _Parsed:
    """Parse both files; bad lines are dropped (and, with ``fix``, quarantined and rewritten)."""
    # Tensor-core traces name intrinsics (wmma_load_..._shared_dyn) registered by importing
    # tvm.s_tir.tensor_intrin: without them a valid record does not parse and would be
    # quarantined as corrupt.
    from .tune import preload_tensor_intrinsics  # pylint: disable=import-outside-toplevel

    preload_tensor_intrinsics()
    wfile, rfile = path / WORKLOAD_FILE, path / RECORD_FILE
    # Workloads: [structural hash string, base64 IRModule JSON]
    wl_lines, workloads, remap, bad_w = [], [], {}, []
    raw_w = _read_lines(wfile)
    old_idx = 0
    for lineno, line in enumerate(raw_w, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            pair = isinstance(obj, list) and len(obj) == 2
            if not (pair and all(isinstance(x, str) for x in obj)):
                raise ValueError("not a [hash, module] pair")
            workload = ms.database.Workload.from_json(obj)
        except Exception as err:  # json or TVM deserialization error
            bad_w.append((lineno, line, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"))
            old_idx += 1
            continue
        remap[old_idx] = len(workloads)
        old_idx += 1
        wl_lines.append(line)
        workloads.append(workload)
    # Records: [workload index, [trace, run_secs, target, args_info]]
    rec_lines, records, bad_r = [], [], []
    raw_r = _read_lines(rfile)
    for lineno, line in enumerate(raw_r, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not (
                isinstance(obj, list)
                and len(obj) == 2
                and isinstance(obj[0], int)
                and isinstance(obj[1], list)
                and len(obj[1]) == 4
            ):
                raise ValueError("not a [workload index, record] pair")
            if obj[0] not in remap:
                raise ValueError(f"workload index {obj[0]} has no valid workload")
            new_idx = remap[obj[0]]
            ms.database.TuningRecord.from_json(obj[1], workloads[new_idx])
        except Exception as err:
            bad_r.append((lineno, line, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"))
            continue
        if new_idx != obj[0]:
            line = json.dumps([new_idx, obj[1]], separators=(",", ":"))
        rec_lines.append(line)
        records.append((new_idx, obj[1]))
    if fix:
        blank_w = sum(1 for x in raw_w if not x.strip())
        blank_r = sum(1 for x in raw_r if not x.strip())
        if bad_w:
            _quarantine(wfile, bad_w)
        if bad_r:
            _quarantine(rfile, bad_r)
        if bad_w or blank_w or (raw_w and not _ends_with_newline(wfile)):
            _atomic_write_text(wfile, "".join(x + "\n" for x in wl_lines))
        if bad_r or bad_w or blank_r or (raw_r and not _ends_with_newline(rfile)):
            _atomic_write_text(rfile, "".join(x + "\n" for x in rec_lines))
    return _Parsed(wl_lines, workloads, rec_lines, records, len(bad_w) + len(bad_r))


def _ends_with_newline(file: Path) -> bool:
    with open(file, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def clean_database(path: str | os.PathLike) -> int:
    """Quarantine corrupt or truncated lines of a JSON database in place.

    Bad lines go to ``<file>.quarantine`` with a warning each; records of a quarantined workload go
    with it; the remaining records are re-indexed. Files are rewritten atomically.

    Returns
    -------
    int
        The number of lines quarantined.
    """
    return _parse_database(Path(path), fix=True).quarantined


def _check_target(path: Path, target: Target, parsed: _Parsed) -> None:
    want = arch_of(target)
    meta = read_meta(path)
    found: dict[str, str] = {}
    if meta and "target" in meta:
        found[f"{META_FILE} target"] = arch_of(meta["target"])
    for _, rec in parsed.records:
        if isinstance(rec[2], dict) and arch_of(rec[2]) != want:
            found["tuning record target"] = arch_of(rec[2])
            break
    for where, arch in found.items():
        if arch != want:
            raise DatabaseMismatchError(
                f"database {path} was tuned for {arch} ({where}) but the build target is {want}; "
                f"use the database under {want}/ or tune one for {want}"
            )
    if want == "cpu" and meta and isinstance(meta.get("target"), dict):
        have_mcpu, want_mcpu = meta["target"].get("mcpu"), target.attrs.get("mcpu")
        if have_mcpu and want_mcpu and str(have_mcpu) != str(want_mcpu):
            raise DatabaseMismatchError(
                f"database {path} was tuned for CPU mcpu={have_mcpu} but the build target has "
                f"mcpu={want_mcpu}; tune a database for this CPU"
            )
    if meta is None and parsed.records:
        logger.warning("%s has no %s; its target cannot be fully checked", path, META_FILE)
    if meta:
        import tvm_ffi

        running = (("tvm_version", tvm.__version__), ("tvm_ffi_version", tvm_ffi.__version__))
        for key, have in running:
            if meta.get(key) and meta[key] != have:
                msg = (
                    f"database {path} was made with {key}={meta[key]}, running {have}; records "
                    "may not replay or may be keyed differently (retune if lookups miss)"
                )
                logger.warning(msg)
                warnings.warn(msg, DatabaseVersionWarning, stacklevel=3)


def open_database(
    path: str | os.PathLike,
    *,
    target: Target,
    create: bool = False,
    module_equality: str = "structural",
) -> ms.database.JSONDatabase:
    """Open a JSON tuning database after checking and cleaning it.

    Parameters
    ----------
    path : path
        The database directory.
    target : tvm.target.Target
        The build (or tuning) target. A database whose ``meta.json`` or records name another
        architecture is refused; a TVM version mismatch only warns.
    create : bool
        Create an empty database if none exists (otherwise a missing database is an error).
    module_equality : str
        MetaSchedule's workload equality (``"structural"`` matches how tasks are keyed).

    Returns
    -------
    tvm.s_tir.meta_schedule.database.JSONDatabase

    Raises
    ------
    FileNotFoundError
        No database at ``path`` and ``create`` is false.
    DatabaseMismatchError
        The database was made for another architecture.
    """
    path = Path(path)
    wfile, rfile = path / WORKLOAD_FILE, path / RECORD_FILE
    if not wfile.exists() and not create:
        raise FileNotFoundError(f"no tuning database at {path} (missing {WORKLOAD_FILE})")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    parsed = _parse_database(path, fix=True)
    _check_target(path, target, parsed)
    return ms.database.JSONDatabase(
        str(wfile), str(rfile), allow_missing=create, module_equality=module_equality
    )


# --------------------------------------------------------------------------------------------
# The committed form: best record per workload
# --------------------------------------------------------------------------------------------


def prune_best(
    path: str | os.PathLike,
    *,
    out_path: str | os.PathLike | None = None,
    verify: Callable[[ms.database.TuningRecord], bool] | None = None,
) -> dict[int, float | None]:
    """Keep only the best valid record per workload (the form committed under ``databases/``).

    Parameters
    ----------
    path : path
        The (full) database directory, e.g. a tuning work dir.
    out_path : path, optional
        Where to write the pruned database; defaults to ``path`` itself (its record file is
        replaced atomically; the workload file is kept, so indices stay valid). A ``meta.json`` in
        ``path`` is copied along with ``"pruned": true``.
    verify : callable, optional
        ``verify(record) -> bool``. When it rejects (or raises on) the fastest record of a
        workload, the next fastest is tried, and so on; each rejection is logged. A workload whose
        records are all rejected keeps none (compile then falls back to the untuned schedule).

    Returns
    -------
    dict
        Workload index → mean seconds of the kept record (``None`` when none was kept).
    """
    path = Path(path)
    out = Path(out_path) if out_path is not None else path
    parsed = _parse_database(path, fix=True)
    by_workload: dict[int, list[tuple[float, int]]] = {i: [] for i in range(len(parsed.workloads))}
    for pos, (widx, rec) in enumerate(parsed.records):
        secs = rec[1]
        if is_failed_run(secs):
            continue
        by_workload[widx].append((sum(float(s) for s in secs) / len(secs), pos))
    kept_lines, summary = [], {}
    for widx, cands in by_workload.items():
        cands.sort()
        summary[widx] = None
        for rank, (secs, pos) in enumerate(cands):
            if verify is not None:
                record = ms.database.TuningRecord.from_json(
                    parsed.records[pos][1], parsed.workloads[widx]
                )
                try:
                    ok = bool(verify(record))
                    why = "verify returned False"
                except Exception as err:  # a crash while checking is a rejection
                    ok, why = False, f"verify raised {type(err).__name__}: {err}"
                if not ok:
                    logger.warning(
                        "workload %d: rejected record ranked %d (%.3f us): %s",
                        widx, rank, secs * 1e6, why,
                    )
                    continue
            kept_lines.append(parsed.record_lines[pos])
            summary[widx] = secs
            break
        if summary[widx] is None and cands:
            logger.warning("workload %d: every record was rejected; none kept", widx)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != path.resolve():
        _atomic_write_text(out / WORKLOAD_FILE, "".join(x + "\n" for x in parsed.workload_lines))
    meta = read_meta(path)
    if meta is not None:  # copied as is (not re-stamped with this TVM's version)
        _atomic_write_text(
            out / META_FILE,
            json.dumps({**meta, "pruned": True}, indent=2, sort_keys=True, default=str),
        )
    _atomic_write_text(out / RECORD_FILE, "".join(x + "\n" for x in kept_lines))
    return summary
