"""What ``tune`` does: partition, pick where to measure, run the MetaSchedule driver, commit.

Layout: the full record log lives in a work directory (``--work-dir``, default
``.tune-work/<database path below DATABASE_DIR>``, git-ignored), which is what resumes an
interrupted run; the committed form, the best verified record per workload, is written
atomically to ``DATABASE_DIR/ARCH/MODEL-QUANT`` (CPU: ``DATABASE_DIR/local/cpu/MODEL-QUANT``,
git-ignored) with its ``meta.json``. A missing work directory is seeded from the committed
database, so tuning on a fresh clone continues from what the repository holds. Both directories
are locked while written (:mod:`tuning.lock`).
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

from tabulate import tabulate

from gpt2_model.config import get_config, model_name
from gpt2_model.device import detect_cuda_arch
from gpt2_model.export import export_model
from gpt2_model.quantization import get_scheme

from .attention import RAGGED_PREFILL, attention_key, read_attention, search_candidates, tune_attention
from .attention_decode_tune import tune_decode_attention
from .norm_gemv_tune import tune_norm_gemv
from .wgmma_tune import MIN_DECODE_ROWS, tune_wgmma_gemm, wgmma_arch
from .config import TuneConfig, TuneError
from .database import DatabaseIntegrityWarning, TunedDatabase, database_path, merge_untuned, prune_best
from .dbfiles import RECORD_FILE, WORKLOAD_FILE, read_meta, record_latency_s, write_meta
from .lock import DirLock
from .partition import attach_twins, buckets_for, summary, table, tasks_of
from .pipeline import prepare
from .progress import fmt_secs
from .rpc import check_tracker, make_rpc_runner, no_device_help, parse_tracker
from .spaces import space_for
from .targets import arch_of, is_gpu, make_target
from .tune import TuneTask, tune_tasks
from .untuned import dlight_rules
from .validate import validate_database
from .verify import make_verifier

__all__ = ["run_tune"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _space(kind: str, target):
    """The design space argument of ``tune_tasks`` for ``--space``."""
    if kind == "generic":
        return "post-order-apply"
    if kind == "dlight":
        return lambda task: None  # no search: only the measured untuned schedule is stored
    if not is_gpu(target):  # the LLM-aware spaces are CUDA schedules; CPUs search the generic space
        return "post-order-apply"
    return lambda task: space_for(task.mod["main"], target=target)


def _runner_for(config: TuneConfig, arch: str):
    """(runner, verify device) for the arch: local GPU/CPU, or an RPC tracker."""
    if config.rpc_tracker:
        host, port = parse_tracker(config.rpc_tracker)
        info = check_tracker(host, port, config.rpc_key)
        servers = int(info.get("free", 1) or 1) if isinstance(info, dict) else 1
        _say(f"measuring over RPC on {servers} server(s) under key {config.rpc_key!r} at {host}:{port}")
        runner = make_rpc_runner(host, port, config.rpc_key, max_workers=max(1, servers))
        return runner, (host, port, config.rpc_key)
    if arch == "cpu":
        return None, None
    local = detect_cuda_arch()
    if local != arch:
        seen = f"this machine's GPU is {local}" if local else "this machine has no CUDA GPU"
        raise TuneError(f"cannot measure {arch} kernels here ({seen}).\n{no_device_help(arch)}")
    return None, None


def _seed_work_dir(work_dir: Path, committed: Path) -> None:
    if (work_dir / WORKLOAD_FILE).exists() or not (committed / WORKLOAD_FILE).exists():
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in (WORKLOAD_FILE, RECORD_FILE):
        shutil.copy2(committed / name, work_dir / name)
    _say(f"seeded {work_dir} from the committed database {committed}")


def run_tune(config: TuneConfig) -> int:  # pylint: disable=too-many-locals,too-many-statements
    """Run the ``tune`` command.

    Parameters
    ----------
    config : TuneConfig
        The run's options (already checked by ``TuneConfig.__post_init__``).

    Returns
    -------
    int
        The exit status (0 on success, 1 when ``--validate`` found bad records).
    """
    start = time.monotonic()
    target = make_target(config.arch)
    arch = arch_of(target)
    model_cfg = get_config(config.model)
    scheme = get_scheme(config.quantization)
    name = model_name(config.model)
    committed = database_path(config.database_dir, arch=arch, model=name, quantization=scheme.name)
    if config.validate:
        if not committed.is_dir():
            raise TuneError(f"no database at {committed}")
        report = validate_database(committed, target=target)
        print(f"{committed}: {report.line()}")
        for failure in report.failures:
            print("  " + failure)
        return 0 if report.ok() else 1
    if config.repair:
        with DirLock(committed, what="committed database", wait=config.wait), warnings.catch_warnings():
            warnings.simplefilter("ignore", DatabaseIntegrityWarning)
            moved = TunedDatabase.open(committed, target=target).repair()
        print(f"{committed}: {moved} bad line(s) moved to *.quarantine")
        return 0
    buckets = buckets_for(model_cfg, prefill=config.prefill_buckets, batch=config.batch_buckets)
    buckets = {p: v for p, v in buckets.items() if p in config.phases}
    runner = verify_device = None
    if not config.list_kernels:
        # Where to measure, checked first: no GPU and no tracker fails at once, before any work.
        runner, verify_device = _runner_for(config, arch)
    _say(config.display())
    _say(f"[export] {name} {scheme.name} for {arch}, buckets {buckets} ...")
    exported = export_model(model_cfg, quantization=scheme.name, target=target, buckets=buckets)
    _say(f"[partition] preparing kernels ({fmt_secs(time.monotonic() - start)} so far) ...")
    prepared = prepare(exported.mod, target=target)
    task_list = attach_twins(prepared, tasks_of(prepared, buckets))
    kinds = set(config.kinds) if config.kinds else None
    if kinds:
        task_list = [t for t in task_list if t.kind in kinds]
    # The KV cache's prefill attention kernel (outside the partition) has its own search
    # (tuning.attention); it runs with the prefill phase on a GPU unless --kinds leaves it out.
    want_attention = is_gpu(target) and "prefill" in buckets and (kinds is None or "attention" in kinds)
    # Likewise the decode attention kernel (tuning.attention_decode's template vs TVM's) with the decode phase.
    want_decode_attention = is_gpu(target) and "decode" in buckets and (kinds is None or "attention" in kinds)
    # The fused layer norm + decode GEMV kernels (gpt2_model.norm_gemv): a template search of their own.
    want_norm_gemv = is_gpu(target) and "decode" in buckets and (kinds is None or "norm-gemv" in kinds)
    # The Hopper wgmma GEMMs (gpt2_model.wgmma_gemm) of prefill chunks and of decode batches from 16 rows:
    # sm_90 only, a template search of their own (after norm-gemv's: it leaves out what those fuse).
    want_wgmma = (wgmma_arch(target) and bool({"prefill", "decode"} & set(buckets))
                  and (kinds is None or "wgmma" in kinds))
    if config.list_kernels:
        print(f"{name} {scheme.name} on {arch}: {len(task_list)} tasks ({time.monotonic() - start:.1f} s)")
        print(table(task_list))
        print(summary(task_list))
        return 0
    # Gathers (embedding rows) read what their indices say: MetaSchedule's random inputs index out
    # of range and crash the measurement, and a row copy has nothing to tune. Listed, not tuned.
    task_list = [t for t in task_list if t.kind != "gather"]
    if not task_list and not (want_attention or want_decode_attention or want_norm_gemv or want_wgmma):
        raise TuneError("no tasks to tune (check --phases / --kinds)")
    rel = committed.relative_to(config.database_dir)
    work_dir = config.work_dir if config.work_dir is not None else Path(".tune-work") / rel
    with DirLock(work_dir, what="tuning work directory", wait=config.wait):
        _seed_work_dir(work_dir, committed)
        if task_list:
            _tune_kernels(config, task_list, target=target, work_dir=work_dir, committed=committed,
                          buckets=buckets, runner=runner, verify_device=verify_device, name=name,
                          scheme=scheme, model_cfg=model_cfg)
    if want_attention:
        with DirLock(committed, what="committed database", wait=config.wait):
            _tune_attention(config, model_cfg=model_cfg, scheme=scheme, target=target, committed=committed,
                            lengths=buckets["prefill"], remote=isinstance(verify_device, tuple),
                            meta={"model": name, "quantization": scheme.name, "config_hash": model_cfg.model_hash()})
    if want_decode_attention:
        with DirLock(committed, what="committed database", wait=config.wait):
            _tune_decode_attention(config, model_cfg=model_cfg, scheme=scheme, target=target, committed=committed,
                                   batches=buckets["decode"], remote=isinstance(verify_device, tuple),
                                   meta={"model": name, "quantization": scheme.name,
                                         "config_hash": model_cfg.model_hash()})
    if want_norm_gemv:
        with DirLock(committed, what="committed database", wait=config.wait):
            _tune_norm_gemv(config, model_cfg=model_cfg, scheme=scheme, target=target, committed=committed,
                            batches=buckets["decode"], remote=isinstance(verify_device, tuple),
                            meta={"model": name, "quantization": scheme.name, "config_hash": model_cfg.model_hash()})
    if want_wgmma:
        with DirLock(committed, what="committed database", wait=config.wait):
            _tune_wgmma(config, model_cfg=model_cfg, scheme=scheme, target=target, committed=committed,
                        lengths=buckets.get("prefill", []), batches=buckets.get("decode", []),
                        remote=isinstance(verify_device, tuple),
                        meta={"model": name, "quantization": scheme.name, "config_hash": model_cfg.model_hash()})
    _say(f"[done] tune finished in {fmt_secs(time.monotonic() - start)}")
    return 0


def _tune_wgmma(config: TuneConfig, *, model_cfg, scheme, target, committed: Path, lengths, batches, remote: bool,
                meta: dict) -> None:
    """Search the Hopper wgmma GEMMs of prefill chunks and decode batches (``tuning.wgmma_tune``) into ``committed``."""
    if scheme.activation_dtype != "float16" or scheme.name != "q0f16":
        _say(f"wgmma: skipped: the kernel takes fp16 weights (q0f16), not {scheme.name}")
        return
    _template_search("wgmma", f"the Hopper wgmma GEMMs of prefill chunks {list(lengths)} and decode batches "
                     f"{[b for b in batches if b >= MIN_DECODE_ROWS]}",
                     lambda: tune_wgmma_gemm(model_cfg, dtype=scheme.activation_dtype, target=target,
                                             out_dir=committed, lengths=lengths, batches=batches,
                                             quantization=scheme.name, workers=config.workers, log=_say),
                     committed=committed, target=target, meta=meta, remote=remote,
                     run={"lengths": list(lengths), "batches": list(batches)})


def _tune_norm_gemv(config: TuneConfig, *, model_cfg, scheme, target, committed: Path, batches, remote: bool,
                    meta: dict) -> None:
    """Search the fused layer norm + decode GEMV kernels (``tuning.norm_gemv_tune``) into ``committed``."""
    _template_search("norm-gemv", f"the fused layer norm + decode GEMV kernels at batches {list(batches)}",
                     lambda: tune_norm_gemv(model_cfg, dtype=scheme.activation_dtype, target=target,
                                            out_dir=committed, batches=batches, quantization=scheme.name,
                                            workers=config.workers, log=_say),
                     committed=committed, target=target, meta=meta, remote=remote, run={"batches": list(batches)})


def _template_search(kind: str, what: str, search, *, committed: Path, target, meta: dict, remote: bool,
                     run: dict) -> None:
    """Run a template search (``search()`` -> the written document) on this machine's GPU and
    record it in ``meta.json`` when it stored anything; skipped over RPC (it measures locally)."""
    if remote:
        _say(f"{kind}: skipped: its search measures on a GPU of this machine, not over RPC "
             f"(run tune --kinds {kind} on the GPU host)")
        return
    _say(f"[{kind}] searching {what}")
    previous = read_meta(committed) or {}
    doc = search()
    if not doc.get("kernels"):
        return
    _record_search(committed, previous, target=target, meta=meta,
                   run={"kinds": kind, **run, "stored": sorted(doc["kernels"])})


def _tune_kernels(config: TuneConfig, task_list, *, target, work_dir: Path, committed: Path, buckets,
                  runner, verify_device, name: str, scheme, model_cfg) -> None:
    per_task = config.trials_per_task
    total = config.trials if config.trials is not None else per_task * len(task_list)
    # One database collects several runs (decode buckets, then prefill...): its meta.json must
    # name every bucket and task it holds, not only the latest run's.
    previous = read_meta(committed) or {}
    all_buckets = {p: sorted(set(v) | set((previous.get("buckets") or {}).get(p, []))) for p, v in buckets.items()}
    for phase, values in (previous.get("buckets") or {}).items():
        all_buckets.setdefault(phase, sorted(values))
    all_tasks = sorted(set(previous.get("tasks") or []) | {t.name for t in task_list})
    _say(f"[tune] {len(task_list)} tasks of {name}-{scheme.name} for {arch_of(target)}: {total} search trials "
         f"(<= {per_task} per task); records in {work_dir}")
    tune_tasks(
        [TuneTask(name=t.name, mod=t.mod(), weight=float(t.weight), untuned_mod=t.untuned_mod()) for t in task_list],
        target=target,
        work_dir=work_dir,
        max_trials_global=total,
        max_trials_per_task=per_task,
        num_trials_per_iter=min(64, per_task),
        runner=runner,
        space=_space(config.space, target),
        seed=config.seed,
        untuned_rules=dlight_rules(target),
        progress=lambda p: _say(p.format()),
        search_seconds=None if config.search_minutes is None else 60.0 * config.search_minutes,
        log=lambda m: _say(f"[{'baseline' if m.startswith('untuned') else 'search'}] {m}"),
        meta={"model": name, "quantization": scheme.name, "buckets": all_buckets, "run_buckets": buckets,
              "config_hash": model_cfg.model_hash(), "trials": total, "trials_per_task": per_task,
              "space": config.space},
        **({"num_tuning_cores": config.workers} if config.workers else {}),
    )
    # Tolerance of the numerical check, relative to the reference's max-abs: fp16 kernels differ
    # by accumulation order (K up to 3072: differences of ~1% of max-abs seen on an H200), fp32 ones barely.
    rtol = 3e-2 if scheme.activation_dtype == "float16" else 1e-4
    write_meta(work_dir, tasks=all_tasks)
    _say(f"[commit] verifying the best record of each workload numerically (records already committed were "
         f"verified then), into {committed}")
    with DirLock(committed, what="committed database", wait=config.wait):
        kept = prune_best(work_dir, out_path=committed, trusted=committed, log=_say,
                          verify=make_verifier(target=target, device_or_rpc=verify_device, rtol=rtol, atol=1e-5))
        merge_untuned(work_dir, committed)  # compile skips records slower than the untuned kernel
        used = (read_meta(work_dir) or {}).get("trials_used")
        _record_run(committed, previous, {"buckets": buckets, "kinds": ",".join(config.kinds or ()) or "all",
                                          "space": config.space, "trials": total, "trials_per_task": per_task,
                                          "trials_used": used})
    print(f"committed {sum(v is not None for v in kept.values())} verified best records to {committed}")
    _print_summary(committed, task_list, target)


def _tune_attention(config: TuneConfig, *, model_cfg, scheme, target, committed: Path, lengths, remote: bool,
                    meta: dict) -> None:
    """Search the KV cache's prefill attention kernel (``tuning.attention``) into ``committed``."""
    if remote:
        _say("attention: skipped: its search measures on a GPU of this machine, not over RPC "
             "(run tune --kinds attention on the GPU host)")
        return
    _say(f"[attention] searching the KV cache's prefill attention kernel at lengths {list(lengths)}")
    previous = read_meta(committed) or {}
    candidates = None
    if config.attention_templates is not None:
        key = attention_key(model_cfg, scheme.activation_dtype)
        stored = next((e for e in (read_attention(committed) or {}).get("kernels", [])
                       if e.get("kernel") == RAGGED_PREFILL), None)
        candidates = search_candidates(key, target, config.attention_templates, stored=stored)
        _say(f"attention: templates {','.join(config.attention_templates)}: {len(candidates)} candidates "
             "(with TVM's kernel and the stored choice)")
    doc = tune_attention(model_cfg, dtype=scheme.activation_dtype, target=target, out_dir=committed, lengths=lengths,
                         candidates=candidates, workers=config.workers, log=_say)
    entry = doc["kernels"][0]
    _record_search(committed, previous, target=target, meta=meta,
                   run={"kinds": "attention", "lengths": list(lengths), "candidates": entry["candidates"],
                        "speedup_geomean": round(1 / entry["best"]["score"], 3)})


def _tune_decode_attention(config: TuneConfig, *, model_cfg, scheme, target, committed: Path, batches, remote: bool,
                           meta: dict) -> None:
    """Search the KV cache's decode attention kernel (``tuning.attention.tune_decode_attention``) into
    ``committed`` (stored only when a checked candidate beats TVM's kernel)."""
    if remote:
        _say("attention: skipped: the decode attention search measures on a GPU of this machine, not over RPC "
             "(run tune --kinds attention on the GPU host)")
        return
    _say(f"[attention] searching the KV cache's decode attention kernel at batches {list(batches)}")
    previous = read_meta(committed) or {}
    res = tune_decode_attention(model_cfg, dtype=scheme.activation_dtype, target=target, out_dir=committed,
                                batches=batches, workers=config.workers, log=_say)
    entry = res["entry"]
    if entry is None:
        return
    _record_search(committed, previous, target=target, meta=meta,
                   run={"kinds": "attention", "kernel": entry["kernel"], "batches": list(batches),
                        "candidates": entry["candidates"], "speedup_geomean": round(entry["speedup"], 3)})


def _record_search(committed: Path, previous: dict, *, target, meta: dict, run: dict) -> None:
    """After a template search stored its choice: a search-only run on a new database still names
    what it is for (``meta``), and the run joins the history."""
    if not previous:
        write_meta(committed, target=target, **meta)
    _record_run(committed, previous, run)


def _record_run(committed: Path, previous: dict, run: dict) -> None:
    """Append this run to the committed meta.json's ``runs`` (the meta written by pruning
    describes only the latest run's settings; the history of runs is kept here)."""
    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run}
    runs = list(previous.get("runs") or []) + [run]
    write_meta(committed, runs=runs, trials=sum(int(r.get("trials") or 0) for r in runs))


def _print_summary(committed: Path, task_list, target) -> None:
    """Per task: untuned time (the dynamic build's kernel), best committed time, speedup."""
    db = TunedDatabase.open(committed, target=target)
    untuned = db.untuned
    rows = []
    for t in task_list:
        base = (untuned.get(t.name) or {}).get("untuned_us")
        rec = db.ms.query_tuning_record(t.mod(), target, "main")
        best = record_latency_s(rec) * 1e6 if rec is not None else None
        speedup = base / best if base and best else None
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        rows.append([t.name, t.kind, t.weight, fmt(base), fmt(best) if best is not None else "untuned kept", fmt(speedup)])
    print(tabulate(rows, headers=["task", "kind", "calls/step", "untuned us", "tuned us", "speedup"],
                   disable_numparse=True))

