"""Offline check of a database: every line parses and every record replays on its workload and builds,
and every stored attention choice (``attention.json``) and fused norm + GEMV choice
(``norm_gemv.json``) and the wgmma GEMM choices (``wgmma_gemm.json``) parse and build for the target.

The numerical check of each committed record ran when it was committed (``prune_best`` with
``tuning.verify.verify_record`` on the card that measured it: tuned kernel vs untuned kernel on
random inputs). This is the part that needs no GPU, so it can run anywhere (CI, a laptop, before
a compile). It never writes: bad lines are reported, not moved (``tune --repair`` moves them).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import tvm
from tvm.s_tir import Schedule
from tvm.target import Target

from .builder import build_kernel
from .database import DatabaseIntegrityWarning, TunedDatabase

__all__ = ["ValidationReport", "validate_attention", "validate_database", "validate_norm_gemv", "validate_wgmma"]


@dataclasses.dataclass
class ValidationReport:
    """What :func:`validate_database` found: counts and one line per failure."""

    records: int
    replayed: int
    built: int
    failures: list[str]
    attention: int = 0
    attention_built: int = 0
    norm_gemv: int = 0
    norm_gemv_built: int = 0
    wgmma: int = 0
    wgmma_built: int = 0

    def ok(self) -> bool:
        """True when every line parsed, every record replayed and built, and every stored
        attention choice built."""
        return (not self.failures and self.records == self.built and self.attention == self.attention_built
                and self.norm_gemv == self.norm_gemv_built and self.wgmma == self.wgmma_built)

    def line(self) -> str:
        """One summary line."""
        return (f"{self.records} records: {self.replayed} replayed, {self.built} built"
                + (f"; attention.json: {self.attention_built} of {self.attention} built" if self.attention else "")
                + (f"; norm_gemv.json: {self.norm_gemv_built} of {self.norm_gemv} built" if self.norm_gemv else "")
                + (f"; wgmma_gemm.json: {self.wgmma_built} of {self.wgmma} built" if self.wgmma else "")
                + (f", {len(self.failures)} failed" if self.failures else ""))


def validate_attention(path: str | Path, *, target: Target, build: bool = True) -> tuple[int, int, list[str]]:
    """Check the stored attention choices of the database at ``path``: ``(entries, built, failures)``.

    The file must parse (:func:`tuning.attention.read_attention`), and each entry's kernel is
    generated from its stored template and constants and built for ``target`` as compile would
    (:func:`tuning.builder.build_kernel`). Only CUDA targets (the KV cache's kernels are GPU
    templates); nothing is checked for other targets. Never writes.
    """
    # pylint: disable=import-outside-toplevel
    from .attention import KERNEL_MAKERS, AttentionError, AttentionKey, read_attention, stored_best

    if target.kind.name != "cuda":
        return 0, 0, []
    try:
        doc = read_attention(path)
    except AttentionError as err:
        return 1, 0, [f"attention.json: {err}"]
    entries = (doc or {}).get("kernels", [])
    built, failures = 0, []
    for i, entry in enumerate(entries):
        try:
            key = AttentionKey(**entry["key"])
            func = KERNEL_MAKERS[entry["kernel"]](stored_best(entry), key, target)
            if build:
                build_kernel(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
            built += 1
        except Exception as err:  # pylint: disable=broad-except
            failures.append(f"attention.json entry {i} ({entry.get('kernel')}): {_reason(err)}")
    return len(entries), built, failures


def validate_norm_gemv(path: str | Path, *, target: Target, build: bool = True) -> tuple[int, int, list[str]]:
    """Check the stored fused norm + GEMV choices (``norm_gemv.json``): ``(entries, built, failures)``.

    Each entry's key and constants must make a kernel (:func:`gpt2_model.norm_gemv.make_norm_gemv`),
    built for ``target`` when ``build``. CUDA targets only (other builds never fuse). Never writes.
    """
    # pylint: disable=import-outside-toplevel
    from gpt2_model.norm_gemv import make_norm_gemv

    from .dbfiles import NORM_GEMV_FILE
    from .norm_gemv_tune import parse_entry

    if target.kind.name != "cuda":
        return 0, 0, []

    def build_one(func):
        build_kernel(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)

    return _validate_entries(path, file=NORM_GEMV_FILE, parse=parse_entry,
                             make=lambda key, cfg, doc: make_norm_gemv(cfg, key, eps=float(doc.get("eps", 1e-5))),
                             build_one=build_one if build else None)


def validate_wgmma(path: str | Path, *, target: Target, build: bool = True) -> tuple[int, int, list[str]]:
    """Check the stored wgmma GEMM choices (``wgmma_gemm.json``): ``(entries, built, failures)``.

    Each entry's key and constants must make a kernel (:func:`gpt2_model.wgmma_gemm.make_gemm`),
    lowered and built for sm_90a when ``build`` (without a GPU TVM keeps the CUDA source: the
    lowering is what is checked). sm_90 targets only (other builds never use it). Never writes.
    """
    # pylint: disable=import-outside-toplevel
    from gpt2_model.wgmma_build import build as build_wgmma
    from gpt2_model.wgmma_gemm import make_gemm

    from .dbfiles import WGMMA_GEMM_FILE
    from .wgmma_tune import parse_gemm_entry, wgmma_arch

    if not wgmma_arch(target):
        return 0, 0, []
    return _validate_entries(path, file=WGMMA_GEMM_FILE, parse=parse_gemm_entry,
                             make=lambda key, cfg, doc: make_gemm(key, cfg, name="main"),
                             build_one=build_wgmma if build else None)


def _validate_entries(path: str | Path, *, file: str, parse, make, build_one) -> tuple[int, int, list[str]]:
    """``(entries, built, failures)`` of a template choice file: each entry parsed (``parse(name,
    entry) -> (key, config)``), its kernel made (``make(key, config, doc)``) and built (``build_one``,
    None: not built)."""
    from .dbfiles import read_json  # pylint: disable=import-outside-toplevel

    try:
        doc = read_json(Path(path) / file, None)
    except Exception as err:  # pylint: disable=broad-except
        return 1, 0, [f"{file}: {_reason(err)}"]
    if doc is None:
        return 0, 0, []
    entries = doc.get("kernels") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        return 1, 0, [f"{file}: no 'kernels' object"]
    built, failures = 0, []
    for name, entry in sorted(entries.items()):
        try:
            key, cfg = parse(name, entry)
            if key is None:
                raise ValueError("the entry has no key")
            func = make(key, cfg, doc)
            if build_one is not None:
                build_one(func)
            built += 1
        except Exception as err:  # pylint: disable=broad-except
            failures.append(f"{file} entry {name}: {_reason(err)}")
    return len(entries), built, failures


def _reason(err: Exception) -> str:
    lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()]
    text = next((x for x in reversed(lines) if "Error" in x and "(not rendered)" not in x), lines[-1] if lines else "")
    return f"{type(err).__name__}: {text[:300]}"


def validate_database(path: str | Path, *, target: Target, build: bool = True) -> ValidationReport:
    """Check every line of the database at ``path`` for ``target``, without changing it.

    Parameters
    ----------
    path : path
        The database directory.
    target : tvm.target.Target
        The target to replay and build for (the database must be for its arch).
    build : bool
        Also build every replayed record (otherwise replay only).

    Returns
    -------
    ValidationReport
        Bad lines (that do not parse, or whose index points at the wrong workload) and records
        that fail to replay or build are failures, each with the reason.
    """
    with warnings.catch_warnings():  # the bad lines are reported below, one by one
        warnings.simplefilter("ignore", DatabaseIntegrityWarning)
        db = TunedDatabase.open(Path(path), target=target)
    failures = [str(b) for b in db.bad_lines]
    records = db.ms.get_all_tuning_records()
    replayed = built = 0
    for i, record in enumerate(records):
        try:
            sch = Schedule(record.workload.mod, error_render_level="detail")
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            replayed += 1
            if build:
                build_kernel(sch.mod, target)
                built += 1
        except Exception as err:  # pylint: disable=broad-except
            failures.append(f"record {i}: {_reason(err)}")
    total = len(records) + len(db.bad_lines)
    n_att, att_built, att_failures = validate_attention(path, target=target, build=build)
    n_ng, ng_built, ng_failures = validate_norm_gemv(path, target=target, build=build)
    n_wg, wg_built, wg_failures = validate_wgmma(path, target=target, build=build)
    return ValidationReport(records=total, replayed=replayed, built=built if build else replayed,
                            failures=failures + att_failures + ng_failures + wg_failures, attention=n_att,
                            attention_built=att_built, norm_gemv=n_ng, norm_gemv_built=ng_built, wgmma=n_wg,
                            wgmma_built=wg_built)
