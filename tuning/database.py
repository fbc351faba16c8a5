"""A tuned database directory as one object: :class:`TunedDatabase`. Every reader goes through it.

Layout (the files: :mod:`tuning.dbfiles`)::

    DATABASE_DIR/ARCH/MODEL-QUANT/              committed GPU databases, e.g. databases/sm_90/gpt2-q0f16/
    DATABASE_DIR/local/cpu/MODEL-QUANT/         CPU databases: machine-specific, git-ignored

``ARCH`` is ``sm_XX``; CPU targets are always named ``cpu`` (the CPU model and LLVM ``mcpu`` are
in ``meta.json``, and a database made on another CPU is refused). CPU databases live under
``local/`` because they are never committed: their records are only valid on the host that
measured them, and ``databases/local/`` is in ``.gitignore``.

Reading never writes: bad lines (truncated by ``kill -9``, corrupt, an index that points at a
workload with other arguments) are skipped in memory with one warning, and the good records are
served from an in-memory MetaSchedule database, so a read-only database opens. Only a writer
(``tune`` on its work directory, ``writer=True``) or an explicit repair (``tune --repair``,
:meth:`TunedDatabase.repair`) moves bad lines to ``<file>.quarantine``.

Identity: ``meta.json`` names the arch, target, model hash and quantization the records are
for; :meth:`TunedDatabase.open` refuses any mismatch with one line naming the field (TVM's record
lookup ignores the target, so nothing else would stop a database for sm_80 applying on sm_90).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .dbfiles import (
    ATTENTION_FILE,
    META_FILE,
    RECORD_FILE,
    UNTUNED_FILE,
    WORKLOAD_FILE,
    BadLine,
    Parsed,
    atomic_write_text,
    is_failed_run,
    parse_database,
    quarantine,
    read_json,
    read_meta,
    record_latency_s,
    write_meta,
)
from .targets import arch_of

__all__ = [
    "META_FILE",
    "RECORD_FILE",
    "UNTUNED_FILE",
    "WORKLOAD_FILE",
    "DatabaseIntegrityWarning",
    "DatabaseMismatchError",
    "DatabaseVersionWarning",
    "TunedDatabase",
    "database_path",
    "open_database",
    "prune_best",
    "read_meta",
    "record_latency_s",
    "write_meta",
]

logger = logging.getLogger(__name__)

LOCAL_DIR = "local"  # DATABASE_DIR/local/: machine-specific (CPU) databases, git-ignored


class DatabaseMismatchError(ValueError):
    """The database was made for another arch, target, model or quantization than asked for."""


class DatabaseVersionWarning(UserWarning):
    """The database was made with another TVM / tvm-ffi version than the one running."""


class DatabaseIntegrityWarning(UserWarning):
    """The database has lines that do not parse or do not fit their workload (skipped)."""


def database_path(root: str | os.PathLike, *, arch: str, model: str, quantization: str) -> Path:
    """Directory of the database of one model/quantization on one architecture.

    Parameters
    ----------
    root : path
        The database root (``databases/`` in the repository).
    arch : str
        ``sm_XX``, or ``cpu`` (then the directory is ``root/local/cpu/``: see the module doc).
    model : str
        Model name, e.g. ``gpt2`` or ``gpt2-medium``.
    quantization : str
        Quantization name, e.g. ``q0f16``.

    Returns
    -------
    pathlib.Path
    """
    if not model or not quantization:
        raise ValueError("database_path needs a model and a quantization name")
    top = Path(root) / LOCAL_DIR / "cpu" if arch == "cpu" else Path(root) / arch
    return top / f"{model}-{quantization}"


def _target_mismatch(meta: dict, target: Target) -> str | None:
    """One line naming the identity field of ``meta`` that ``target`` does not match."""
    want = arch_of(target)
    if meta.get("arch") is not None and str(meta["arch"]) != want:
        return f"arch: the database is for {meta['arch']}, the build target is {want}"
    if isinstance(meta.get("target"), dict):
        have = arch_of(meta["target"])
        if have != want:
            return f"target: the database's target is {have}, the build target is {want}"
        if want == "cpu":
            have_mcpu, want_mcpu = meta["target"].get("mcpu"), target.attrs.get("mcpu")
            if have_mcpu and want_mcpu and str(have_mcpu) != str(want_mcpu):
                return (f"target: the database was tuned for CPU mcpu={have_mcpu}, the build target has "
                        f"mcpu={want_mcpu}")
    return None


_WARNED: set[tuple] = set()


def _warn_once(key: tuple, msg: str, category: type[Warning]) -> None:
    """One warning per (database, content) per process, whatever the warnings filter says."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(msg, category, stacklevel=4)


class TunedDatabase:
    """One tuning database directory, opened once: records, meta, untuned times, attention.

    Use :meth:`open` (or :meth:`find` to locate one the way ``compile`` and ``bench`` do).

    Attributes
    ----------
    path : pathlib.Path
        The directory.
    meta : dict
        ``meta.json`` (``{}`` when there is none).
    ms : tvm.s_tir.meta_schedule.database.Database
        The records, for MetaSchedule's queries (``query_tuning_record``, ``query_schedule``).
        A reader gets an in-memory copy of the good records; a writer the ``JSONDatabase`` on the
        files.
    bad_lines : list of tuning.dbfiles.BadLine
        Lines skipped (reader) or quarantined (writer), each with the reason.
    """

    def __init__(self, path: Path, *, meta: dict, ms_db, parsed: Parsed):
        self.path = path
        self.meta = meta
        self.ms = ms_db
        self.bad_lines: list[BadLine] = list(parsed.bad)
        self._parsed = parsed

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, target: Target, model_hash: str | None = None,
             quantization: str | None = None, writer: bool = False,
             module_equality: str = "structural") -> TunedDatabase:
        """Open and check a database directory.

        Parameters
        ----------
        path : path
            The directory.
        target : tvm.target.Target
            The build (or tuning) target: ``meta.json``'s ``arch`` and ``target`` (and every
            record's target) must match it.
        model_hash : str, optional
            ``GPT2Config.model_hash()`` of the model being built; checked against ``meta.json``'s
            ``config_hash`` when both are known.
        quantization : str, optional
            Checked against ``meta.json``'s ``quantization``.
        writer : bool
            Open as the one writer (``tune`` on its work directory, which the caller has locked):
            the directory is created if missing, bad lines are quarantined, and :attr:`ms` is a
            ``JSONDatabase`` that appends to the files. Otherwise nothing is ever written.
        module_equality : str
            MetaSchedule's workload equality (``"structural"`` matches how tasks are keyed).

        Raises
        ------
        FileNotFoundError
            No database at ``path`` (reader).
        DatabaseMismatchError
            An identity field differs; the one-line message names the field.
        """
        path = Path(path)
        wfile, rfile = path / WORKLOAD_FILE, path / RECORD_FILE
        if writer:
            path.mkdir(parents=True, exist_ok=True)
        elif not wfile.is_file():
            raise FileNotFoundError(f"no tuning database at {path} (missing {WORKLOAD_FILE})")
        meta = read_meta(path) or {}
        parsed = parse_database(path)
        cls._check_identity(path, meta, parsed, target=target, model_hash=model_hash,
                            quantization=quantization)
        if parsed.bad:
            reasons = "; ".join(str(b) for b in parsed.bad[:3]) + ("; ..." if len(parsed.bad) > 3 else "")
            what = "quarantined" if writer else "skipped (the files are left as they are; `tune --repair` moves them out)"
            stat = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in (wfile, rfile) if f.exists())
            _warn_once((str(path.resolve()), stat, writer),
                       f"database {path}: {len(parsed.bad)} bad line(s) {what}: {reasons}", DatabaseIntegrityWarning)
        if writer:
            quarantine(path, parsed)
            ms_db = ms.database.JSONDatabase(str(wfile), str(rfile), allow_missing=True,
                                             module_equality=module_equality)
        else:
            ms_db = ms.database.MemoryDatabase(module_equality=module_equality)
            handles = [ms_db.commit_workload(w.mod) for w in parsed.workloads]
            for widx, rec in parsed.records:
                ms_db.commit_tuning_record(ms.database.TuningRecord.from_json(rec, handles[widx]))
        return cls(path, meta=meta, ms_db=ms_db, parsed=parsed)

    @staticmethod
    def _check_identity(path: Path, meta: dict, parsed: Parsed, *, target: Target,
                        model_hash: str | None, quantization: str | None) -> None:
        problem = _target_mismatch(meta, target) if meta else None
        if problem is None:
            want = arch_of(target)
            for _, rec in parsed.records:
                if isinstance(rec[2], dict) and arch_of(rec[2]) != want:
                    problem = f"tuning record target: a record is for {arch_of(rec[2])}, the build target is {want}"
                    break
        if problem is None and model_hash and meta.get("config_hash") and meta["config_hash"] != model_hash:
            problem = (f"model hash: the database is for model {meta.get('model')} (config_hash "
                       f"{meta['config_hash']}), not this model ({model_hash})")
        if problem is None and quantization and meta.get("quantization") and meta["quantization"] != quantization:
            problem = f"quantization: the database is for {meta['quantization']}, not {quantization}"
        if problem is not None:
            raise DatabaseMismatchError(f"database {path} refused: {problem}")
        if not meta and parsed.records:
            logger.warning("%s has no %s; its target cannot be fully checked", path, META_FILE)
        running = (("tvm_version", tvm.__version__), ("tvm_ffi_version", tvm_ffi.__version__))
        for key, have in running:
            if meta.get(key) and meta[key] != have:
                _warn_once((str(path.resolve()), key, meta[key]),
                           f"database {path} was made with {key}={meta[key]}, running {have}; records "
                           "may not replay or may be keyed differently (retune if lookups miss)",
                           DatabaseVersionWarning)

    @classmethod
    def find(cls, *, root: str | os.PathLike, target: Target, model: str, quantization: str,
             explicit: str | os.PathLike | None = None, model_hash: str | None = None,
             ) -> tuple[TunedDatabase | None, str]:
        """Locate and open the database a build of (model, quantization) on ``target`` uses.

        Parameters
        ----------
        root : path
            The database root (``databases/``).
        target : tvm.target.Target
        model, quantization : str
        explicit : path, optional
            A directory chosen by the user (``--database``): it must exist.
        model_hash : str, optional
            See :meth:`open`.

        Returns
        -------
        (TunedDatabase or None, str)
            The database and the path it came from, or ``None`` and a one-line message naming
            the path looked in and the ``tune`` command that would create it.
        """
        if explicit is not None:
            path = Path(explicit)
            if not (path / WORKLOAD_FILE).is_file():
                raise FileNotFoundError(f"tuned database {path} does not exist (no {WORKLOAD_FILE} there)")
        else:
            arch = arch_of(target)
            path = database_path(root, arch=arch, model=model, quantization=quantization)
            if not (path / WORKLOAD_FILE).is_file():
                return None, (f"no tuned database found at {path}: untuned build (make one with "
                              f"`tune --arch {arch} --model {model} --quantization {quantization}`)")
        db = cls.open(path, target=target, model_hash=model_hash, quantization=quantization)
        return db, f"using tuned database {path}"

    @staticmethod
    def matching(root: str | os.PathLike, *, arch: str, model_hash: str, quantization: str) -> list[Path]:
        """Databases under ``root`` whose ``meta.json`` names this arch, model hash and quantization."""
        out = []
        for meta_file in sorted(Path(root).glob(f"*/*/{META_FILE}")) + sorted(Path(root).glob(f"{LOCAL_DIR}/*/*/{META_FILE}")):
            try:
                meta = read_meta(meta_file.parent) or {}
            except ValueError:
                continue
            if (meta.get("arch"), meta.get("config_hash"), meta.get("quantization")) == (arch, model_hash, quantization):
                out.append(meta_file.parent)
        return out

    # -- contents --------------------------------------------------------------------------

    @property
    def buckets(self) -> dict[str, list[int]]:
        """The bucket entry points the records were tuned for, per phase (``meta.json``)."""
        return {p: sorted(int(v) for v in vs) for p, vs in (self.meta.get("buckets") or {}).items()}

    @property
    def untuned(self) -> dict[str, dict]:
        """``untuned.json``: per task name its untuned candidates' times (``{}`` if absent)."""
        return read_json(self.path / UNTUNED_FILE, {})

    @property
    def untuned_us(self) -> dict[str, float]:
        """Task name -> microseconds of the untuned build's kernel (records slower are skipped)."""
        return {name: float(e["untuned_us"]) for name, e in self.untuned.items() if e.get("untuned_us")}

    @property
    def attention(self) -> dict | None:
        """``attention.json`` (the tuned KV-cache prefill attention choice), ``None`` if absent."""
        return read_json(self.path / ATTENTION_FILE)

    @property
    def num_records(self) -> int:
        """Good records held."""
        return len(self._parsed.records)

    @property
    def workloads(self) -> list:
        """The good workloads (``ms.database.Workload``), in file order."""
        return list(self._parsed.workloads)

    def repair(self) -> int:
        """Move the bad lines to ``<file>.quarantine`` and rewrite the files (``tune --repair``).

        Returns
        -------
        int
            The number of lines moved out.
        """
        quarantine(self.path, self._parsed)
        return len(self._parsed.bad)


def open_database(path: str | os.PathLike, *, target: Target, create: bool = False,
                  module_equality: str = "structural"):
    """The MetaSchedule database of a directory (``TunedDatabase.open(...).ms``).

    ``create=True`` opens it as the writer (see :meth:`TunedDatabase.open`).
    """
    return TunedDatabase.open(path, target=target, writer=create, module_equality=module_equality).ms


# --------------------------------------------------------------------------------------------
# The committed form: best record per workload
# --------------------------------------------------------------------------------------------


def prune_best(
    path: str | os.PathLike,
    *,
    out_path: str | os.PathLike | None = None,
    verify: Callable[[ms.database.TuningRecord], bool] | None = None,
    trusted: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[int, float | None]:
    """Keep only the best valid record per workload (the form committed under ``databases/``).

    Parameters
    ----------
    path : path
        The (full) database directory, e.g. a tuning work dir. Its bad lines are skipped.
    out_path : path, optional
        Where to write the pruned database; defaults to ``path`` itself (its record file is
        replaced atomically; the workload file is kept, so indices stay valid). A ``meta.json`` in
        ``path`` is copied along with ``"pruned": true``.
    verify : callable, optional
        ``verify(record) -> bool``. When it rejects (or raises on) the fastest record of a
        workload, the next fastest is tried, and so on; each rejection is logged. A workload whose
        records are all rejected keeps none (compile then falls back to the untuned schedule).
    trusted : path, optional
        A committed database whose records were verified when they were committed: a record found
        there unchanged (same workload, same trace, same times) is kept without checking it again
        (a work directory seeded from the committed database holds all of them).
    log : callable, optional
        Progress lines (one per verified workload).

    Returns
    -------
    dict
        Workload index → mean seconds of the kept record (``None`` when none was kept).
    """
    path = Path(path)
    out = Path(out_path) if out_path is not None else path
    parsed = parse_database(path)
    by_workload: dict[int, list[tuple[float, int]]] = {i: [] for i in range(len(parsed.workloads))}
    for pos, (widx, rec) in enumerate(parsed.records):
        secs = rec[1]
        if is_failed_run(secs):
            continue
        by_workload[widx].append((sum(float(s) for s in secs) / len(secs), pos))
    known = _record_keys(Path(trusted)) if trusted is not None and verify is not None else set()
    kept_lines, summary = [], {}
    to_check = sum(1 for w, c in by_workload.items() if c and _record_key(parsed, w, min(c)[1]) not in known)
    checked = 0
    for widx, cands in by_workload.items():
        cands.sort()
        summary[widx] = None
        for rank, (secs, pos) in enumerate(cands):
            if verify is not None and _record_key(parsed, widx, pos) not in known:
                if rank == 0:
                    checked += 1
                    if log is not None:
                        log(f"verify {checked}/{to_check}: workload {widx} ({secs * 1e6:.2f} us)")
                record = ms.database.TuningRecord.from_json(parsed.records[pos][1], parsed.workloads[widx])
                try:
                    ok = bool(verify(record))
                    why = "verify returned False"
                except Exception as err:  # a crash while checking is a rejection
                    ok, why = False, f"verify raised {type(err).__name__}: {err}"
                if not ok:
                    logger.warning("workload %d: rejected record ranked %d (%.3f us): %s",
                                   widx, rank, secs * 1e6, why)
                    continue
            kept_lines.append(parsed.record_lines[pos])
            summary[widx] = secs
            break
        if summary[widx] is None and cands:
            logger.warning("workload %d: every record was rejected; none kept", widx)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != path.resolve() or parsed.needs_rewrite:
        atomic_write_text(out / WORKLOAD_FILE, "".join(x + "\n" for x in parsed.workload_lines))
    meta = read_meta(path)
    if meta is not None:  # copied as is (not re-stamped with this TVM's version)
        atomic_write_text(out / META_FILE, json.dumps({**meta, "pruned": True}, indent=2, sort_keys=True, default=str))
    atomic_write_text(out / RECORD_FILE, "".join(x + "\n" for x in kept_lines))
    return summary


def _record_key(parsed, widx: int, pos: int) -> tuple[str, str]:
    return parsed.workload_lines[widx], json.dumps(parsed.records[pos][1], sort_keys=True)


def _record_keys(path: Path) -> set[tuple[str, str]]:
    """(workload line, record JSON) of every good record of the database at ``path``."""
    if not (path / RECORD_FILE).exists():
        return set()
    parsed = parse_database(path)
    return {_record_key(parsed, w, pos) for pos, (w, _) in enumerate(parsed.records)}


def merge_untuned(src: Path, dst: Path) -> None:
    """Add a run's untuned kernel times (``src/untuned.json``) to ``dst/untuned.json`` (a run of
    other buckets, or a work directory started afresh, must not drop earlier runs' entries)."""
    table: dict[str, Any] = {}
    try:
        table = read_json(dst / UNTUNED_FILE, {})
    except ValueError:
        logger.warning("%s is not valid JSON: replaced by this run's untuned times", dst / UNTUNED_FILE)
    table.update(read_json(src / UNTUNED_FILE, {}))
    atomic_write_text(dst / UNTUNED_FILE, json.dumps(table, indent=2, sort_keys=True))
