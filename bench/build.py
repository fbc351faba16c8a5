"""Build (or fetch from the on-disk cache) the untuned and tuned libraries, and load engines.

``bench`` never tunes: it compiles through ``tuning.compile.build`` (untuned: dlight / default
LLVM; tuned: the same plus the records of a database) and loads the result into
``gpt2_model.runtime.Engine``.

Library cache
-------------
Building a GPT-2 library takes from seconds (tiny, CPU) to minutes (gpt2-xl, CUDA), so each
library is exported once to ``<cache-dir>/<key>/lib.so`` (default ``~/.cache/gpt2k/libs``,
``$GPT2K_CACHE_DIR`` or ``--cache-dir``) next to a ``meta.json`` describing it. The key is a
SHA-256 over everything that changes the compiled code:

* the model config (``GPT2Config.to_dict()``) and the quantization,
* the target JSON (``Target.export()``),
* the database content hash (``None`` for untuned),
* the TVM version and git commit,
* the CUDA-graph setting,
* a hash of the Python sources of ``gpt2_model/`` and ``tuning/`` (the export and pipeline
  code is part of "the compiler": a changed pass order must not reuse a stale library).

A second run with the same inputs loads ``lib.so`` instead of rebuilding (``cache_hit`` in
the result's ``build`` record). Writes are atomic (temp dir + rename), so concurrent runs at
worst both build.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuning.database import DatabaseMismatchError, TunedDatabase

__all__ = [
    "DEFAULT_CACHE_DIR",
    "default_cache_dir",
    "source_hash",
    "library_key",
    "DatabaseInfo",
    "DatabaseError",
    "locate_database",
    "BuiltEngine",
    "load_engine",
]

DEFAULT_CACHE_DIR = "~/.cache/gpt2k/libs"
_CACHE_FORMAT = 1


class DatabaseError(ValueError):
    """A tuning database that cannot be used (wrong arch, model, quantization, corrupt)."""


def default_cache_dir() -> Path:
    """``$GPT2K_CACHE_DIR`` or ``~/.cache/gpt2k/libs``."""
    return Path(os.environ.get("GPT2K_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def _hash_files(paths: list[Path], *, root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of the ``.py`` sources of ``gpt2_model`` and ``tuning`` (the compile path).

    Computed once per process: the library must match the code this process imported, even if
    the files change on disk while it runs.
    """
    import gpt2_model
    import tuning

    files: list[Path] = []
    root = Path(gpt2_model.__file__).resolve().parent.parent
    for pkg in (gpt2_model, tuning):
        files.extend(Path(pkg.__file__).resolve().parent.rglob("*.py"))
    return _hash_files(files, root=root)


def _tvm_version() -> str:
    import tvm

    commit = ""
    try:
        commit = str(tvm.support.libinfo().get("GIT_COMMIT_HASH", ""))
    except Exception:
        pass
    return f"{tvm.__version__}+{commit}" if commit else str(tvm.__version__)


def _plain(x: Any) -> Any:
    """TVM containers (Map, Array, String, IntImm) -> plain JSON-able Python values."""
    if hasattr(x, "items"):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or (hasattr(x, "__len__") and hasattr(x, "__getitem__")
                                         and not isinstance(x, (str, bytes))):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, int, float)) or x is None:
        return x
    if hasattr(x, "value"):  # IntImm / FloatImm
        return x.value
    return str(x)


def target_json(target) -> str:
    """Canonical JSON of a target (``Target.export()`` as plain values, keys sorted)."""
    return json.dumps(_plain(target.export()), sort_keys=True)


def library_key(*, config, quantization: str, target, database_hash: str | None, cuda_graph: bool,
                code_hash: str | None = None) -> tuple[str, dict[str, Any]]:
    """Cache key of one library.

    Returns
    -------
    (key, parts)
        ``key`` is a 24-hex-digit SHA-256 prefix, ``parts`` the JSON-ready inputs hashed.
    """
    from tuning.pdl import pdl_mode  # pylint: disable=import-outside-toplevel

    pdl = pdl_mode(target)
    parts = {
        "format": _CACHE_FORMAT,
        "config": config.to_dict(),
        "quantization": quantization,
        "target": target_json(target),
        "database_hash": database_hash,
        "tvm": _tvm_version(),
        "cuda_graph": bool(cuda_graph),
        # GPT2K_PDL (tuning.pdl): another library (off False and "1" True, as keyed since 2026-12-07)
        "pdl": {None: False, "trigger": True}.get(pdl, pdl),
        "code": code_hash if code_hash is not None else source_hash(),
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24], parts


# ---------------------------------------------------------------------------------------------
# Databases
# ---------------------------------------------------------------------------------------------
@dataclass
class DatabaseInfo:
    """The tuned variant's database: the :class:`tuning.database.TunedDatabase` (the one owner of
    the directory: records, ``meta.json``, ``untuned.json``, ``attention.json``, identity checks)
    plus the content hash that keys the library cache and is recorded with every result.

    Attributes
    ----------
    db : tuning.database.TunedDatabase
    hash : str
        Content hash (of every file in the directory, names and bytes).
    """

    db: TunedDatabase
    hash: str

    @property
    def path(self) -> Path:
        """The database directory."""
        return self.db.path

    @property
    def meta(self) -> dict[str, Any]:
        """``meta.json`` (``{}`` when there is none)."""
        return self.db.meta

    def to_dict(self) -> dict[str, Any]:
        """JSON form for results."""
        return {"path": str(self.path), "hash": self.hash, "meta": self.meta}


def database_hash(path: Path) -> str:
    """SHA-256 over the names and bytes of the files of a database directory; hidden files (the
    ``.tune.lock`` a tune leaves behind: ``tuning.lock`` never deletes its lock file) are not part
    of the database. (On the H200 box a lock left by one call's tune changed the hash in the next
    call and made bench rebuild a library carried there prebuilt: ~1 device minute, 2026-12-02.)"""
    files = [p for p in Path(path).rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return _hash_files(files, root=Path(path))


def locate_database(*, database_dir: str | Path, model: str, quantization: str, target,
                    explicit: str | Path | None = None, model_hash: str | None = None,
                    ) -> tuple[DatabaseInfo | None, str | None]:
    """Locate and open the tuned variant's database through :meth:`TunedDatabase.find` (bench's side of
    the one lookup, adding the hash a result records; compile's side is ``tuning.apply.find_database``).

    Parameters
    ----------
    database_dir : path
        Root of the database tree (``databases/``).
    model, quantization : str
    target : tvm.target.Target
        The build target (its arch selects the directory; identity fields are checked against it).
    explicit : path, optional
        ``--database PATH``: use this directory instead of the tree lookup.
    model_hash : str, optional
        ``GPT2Config.model_hash()``, checked against ``meta.json``'s ``config_hash``.

    Returns
    -------
    (DatabaseInfo or None, message or None)
        ``(None, message)`` when no database exists; the message names the path looked in and the
        ``tune`` command that would create it.

    Raises
    ------
    DatabaseError
        The database exists but belongs to another arch/target/model/quantization, or ``explicit``
        does not exist.
    """
    try:
        db, msg = TunedDatabase.find(root=database_dir, target=target, model=model, quantization=quantization,
                                     explicit=explicit, model_hash=model_hash)
    except FileNotFoundError as e:
        raise DatabaseError(f"--database {explicit}: {e}") from None
    except DatabaseMismatchError as e:
        raise DatabaseError(f"{e}; tuned records do not transfer: tune for this build") from None
    if db is None:
        return None, f"{msg}; benchmarking the untuned build only"
    return DatabaseInfo(db=db, hash=database_hash(db.path)), None


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------
@dataclass
class BuiltEngine:
    """An engine plus how its library was obtained.

    Attributes
    ----------
    engine : gpt2_model.runtime.Engine
    info : dict
        ``key, library, cache_hit, build_s, load_s, database`` (JSON-ready).
    """

    engine: Any
    info: dict[str, Any]


def _build_library(*, config, quantization: str, target, database: DatabaseInfo | None, cuda_graph: bool,
                   out: Path) -> tuple[dict[str, Any], Any]:
    """Build through ``tuning.compile.build_model`` and export to ``out``; returns what a later
    load needs to rebuild the matching ``ExportedModel`` (the bucket entry points) plus the
    tuning coverage lines."""
    from gpt2_model.cuda_binary import precompile
    from tuning.compile import build_model

    res = build_model(config, quantization=quantization, target=target,
                      database=database.path if database else None, cuda_graph=cuda_graph)
    res.executable.export_library(str(out))
    # the CUDA source compiled now, beside the library, instead of at every load (gpt2_model.cuda_binary)
    cuda_binary = precompile(res.executable, out, target)
    return {"cuda_binary": cuda_binary,
            "buckets": {k: [int(v) for v in vals] for k, vals in (res.buckets or {}).items()},
            "export_metadata": res.exported.metadata,  # a later load opens the library without re-exporting
            "coverage": res.coverage.lines() if res.coverage is not None else None,
            "coverage_buckets": ({k: list(v) for k, v in res.coverage.per_bucket.items()}
                                 if res.coverage is not None else None)}, res.exported


def ensure_library(*, config, quantization: str, target, database: DatabaseInfo | None = None,
                   cuda_graph: bool = False, cache_dir: str | Path | None = None, use_cache: bool = True):
    """The library of one variant in the cache: built unless already there (no device needed: a
    CUDA library can be built on a machine without a GPU and carried to one, ``scripts/prebuild_libs.py``).

    Returns
    -------
    (lib_dir, key, meta, cache_hit, build_s, exported)
        ``lib_dir / "lib.so"`` is the library; ``exported`` is the ``ExportedModel`` of a fresh
        build (``None`` on a cache hit).
    """
    cuda_graph = bool(cuda_graph) and target.kind.name == "cuda"  # meaningless elsewhere: one cache entry
    key, parts = library_key(config=config, quantization=quantization, target=target,
                             database_hash=database.hash if database else None, cuda_graph=cuda_graph)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    lib_dir = root / key
    lib = lib_dir / "lib.so"
    hit = use_cache and lib.is_file() and (lib_dir / "meta.json").is_file()
    build_s = 0.0
    exported = None
    if hit:
        meta = json.loads((lib_dir / "meta.json").read_text())
    else:
        t0 = time.perf_counter()
        if use_cache:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
            try:
                built, exported = _build_library(config=config, quantization=quantization, target=target,
                                                 database=database, cuda_graph=cuda_graph, out=tmp / "lib.so")
                meta = dict(parts, **built, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            database_path=str(database.path) if database else None)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
                try:
                    os.replace(tmp, lib_dir)
                except OSError:  # another run won the race: use theirs
                    pass
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        else:
            lib_dir = Path(tempfile.mkdtemp(prefix="gpt2k-lib-"))
            lib = lib_dir / "lib.so"
            meta, exported = _build_library(config=config, quantization=quantization, target=target,
                                            database=database, cuda_graph=cuda_graph, out=lib)
        build_s = time.perf_counter() - t0
    return lib_dir, key, meta, hit, build_s, exported


def load_engine(*, config, quantization: str, device: str, target, params_fp32: dict[str, np.ndarray],
                database: DatabaseInfo | None = None, cuda_graph: bool = False,
                cache_dir: str | Path | None = None, use_cache: bool = True,
                max_batch_size: int | None = None, max_total_seq_len: int | None = None) -> BuiltEngine:
    """Build-or-fetch the library, and load an Engine with ``params_fp32``.

    Parameters
    ----------
    config : GPT2Config
    quantization : str
    device : str
        ``cpu`` or ``cuda:N``.
    target : tvm.target.Target
    params_fp32 : dict
        fp32 weights under our names; converted to the scheme's stored form here.
    database : DatabaseInfo, optional
        ``None`` builds the untuned library.
    cuda_graph : bool
        Capture decode into CUDA graphs (ignored on CPU by the compiler).
    cache_dir : path, optional
        Library cache root (default :func:`default_cache_dir`).
    use_cache : bool
        ``False`` always rebuilds (in a temporary directory, not the cache).
    max_batch_size, max_total_seq_len : int, optional
        KV-cache capacity of the engine.

    Returns
    -------
    BuiltEngine
    """
    from gpt2_model import cuda_binary
    from gpt2_model.export import export_model, exported_info
    from gpt2_model.quantization import convert_params
    from gpt2_model.runtime import Engine

    cuda_graph = bool(cuda_graph) and target.kind.name == "cuda"  # meaningless elsewhere: one cache entry
    lib_dir, key, meta, hit, build_s, exported = ensure_library(
        config=config, quantization=quantization, target=target, database=database, cuda_graph=cuda_graph,
        cache_dir=cache_dir, use_cache=use_cache)
    lib = lib_dir / "lib.so"
    if exported is None and meta.get("export_metadata"):  # cache hit: the build's own export metadata
        exported = exported_info(config, meta["export_metadata"])
    if exported is None:  # a cache entry from before export_metadata: the same export as the build (slow: gpt2 ~1-2 min)
        from tuning.compile import template_plans

        exported = export_model(config, quantization=quantization, target=target, buckets=meta.get("buckets") or None,
                                **template_plans(database.path if database is not None else None, target))
    t0 = time.perf_counter()
    before = cuda_binary.stats()
    module = cuda_binary.load_module(lib)
    t_module = time.perf_counter()
    after = cuda_binary.stats()
    params = convert_params(params_fp32, exported.scheme)
    t_params = time.perf_counter()
    kwargs = {}
    if max_batch_size is not None:
        kwargs["max_batch_size"] = max_batch_size
    if max_total_seq_len is not None:
        kwargs["max_total_seq_len"] = max_total_seq_len
    engine = Engine(exported=exported, executable=module, params=params, device=device, target=target,
                    cuda_graph=cuda_graph, **kwargs)
    t_engine = time.perf_counter()
    load_s = t_engine - t0
    # where a load goes (34 s in module_s on an H100, 2026-12-07: NVRTC compiling the library's CUDA source);
    # cubins: sources served precompiled from the library's sidecar, compiled: sources compiled at this load
    load_parts = {"module_s": t_module - t0, "params_s": t_params - t_module, "engine_s": t_engine - t_params,
                  "cubins": after["hits"] - before["hits"], "compiled": after["misses"] - before["misses"]}
    info = {
        "key": key,
        "library": str(lib),
        "cache_hit": bool(hit),
        "build_s": build_s,
        "load_s": load_s,
        "load_parts": load_parts,
        "cuda_graph": bool(cuda_graph),
        "database": database.to_dict() if database else None,
        "buckets": meta.get("buckets") or {},
        "coverage": meta.get("coverage"),
        "coverage_buckets": meta.get("coverage_buckets"),
    }
    return BuiltEngine(engine=engine, info=info)
