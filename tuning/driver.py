"""What ``tune`` does: partition, pick where to measure, run the MetaSchedule driver, commit.

Layout: the full record log lives in a work directory (``--work-dir``, default
``.tune-work/ARCH/MODEL-QUANT``, git-ignored), which is what resumes an interrupted run; the
committed form, the best verified record per workload, is written atomically to
``DATABASE_DIR/ARCH/MODEL-QUANT`` with its ``meta.json``. A missing work directory is seeded from
the committed database, so tuning on a fresh clone continues from what the repository holds.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from gpt2_model.config import get_config, model_name
from gpt2_model.quantization import get_scheme

from .partition import attach_twins, buckets_for, summary, table, tasks_of
from .pipeline import prepare

logger = logging.getLogger(__name__)


class TuneError(ValueError):
    """A tune request that cannot run here (no device, bad tracker, ...)."""


def _space(kind: str, target):
    """The design space argument of ``tune_tasks`` for ``--space``."""
    if kind == "generic":
        return "post-order-apply"
    if kind == "dlight":
        return lambda task: None  # no search: only the measured untuned schedule is stored
    from .compile import is_gpu  # pylint: disable=import-outside-toplevel

    if not is_gpu(target):  # the LLM-aware spaces are CUDA schedules; CPUs search the generic space
        return "post-order-apply"
    try:
        from .spaces import space_for  # pylint: disable=import-outside-toplevel
    except ImportError:
        logger.warning("LLM-aware spaces unavailable: using MetaSchedule's generic space")
        return "post-order-apply"
    return lambda task: space_for(task.mod["main"], target=target)


def _runner_for(args, target, arch: str):
    """(runner, verify device) for the arch: local GPU/CPU, or an RPC tracker."""
    from .rpc import check_tracker, make_rpc_runner, no_device_help, parse_tracker  # pylint: disable=import-outside-toplevel
    from .targets import detect_local_cuda_arch  # pylint: disable=import-outside-toplevel

    if args.rpc_tracker:
        if not args.rpc_key:
            raise TuneError("--rpc-tracker needs --rpc-key (the key the RPC servers registered with)")
        host, port = parse_tracker(args.rpc_tracker)
        info = check_tracker(host, port, args.rpc_key)
        servers = int(info.get("free", 1) or 1) if isinstance(info, dict) else 1
        runner = make_rpc_runner(host, port, args.rpc_key, max_workers=max(1, servers))
        return runner, (host, port, args.rpc_key)
    if arch == "cpu":
        return None, None
    local = detect_local_cuda_arch()
    if local != arch:
        seen = f"this machine's GPU is {local}" if local else "this machine has no CUDA GPU"
        raise TuneError(f"cannot measure {arch} kernels here ({seen}).\n{no_device_help(arch)}")
    return None, None


def _merge_untuned(src: Path, dst: Path) -> None:
    """Add this run's untuned kernel times to the committed ones (a run of other buckets, or a
    work directory started afresh, must not drop the entries of earlier runs)."""
    table = {}
    if dst.is_file():
        try:
            table = json.loads(dst.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON: replaced by this run's untuned times", dst)
    table.update(json.loads(src.read_text()))
    from .database import _atomic_write_text  # pylint: disable=import-outside-toplevel

    _atomic_write_text(dst, json.dumps(table, indent=2, sort_keys=True))


def _seed_work_dir(work_dir: Path, committed: Path) -> None:
    if (work_dir / "database_workload.json").exists() or not (committed / "database_workload.json").exists():
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy2(committed / name, work_dir / name)
    logger.info("seeded %s from the committed database %s", work_dir, committed)


def run_tune(args) -> int:  # pylint: disable=too-many-locals
    """Entry point of the ``tune`` command (``args`` from :func:`tuning.cli.build_parser`)."""
    from gpt2_model.export import export_model  # pylint: disable=import-outside-toplevel

    from .targets import arch_of, make_target  # pylint: disable=import-outside-toplevel

    target = make_target(args.arch)
    arch = arch_of(target)
    config = get_config(args.model)
    scheme = get_scheme(args.quantization)
    name = model_name(args.model)
    buckets = buckets_for(config, prefill=args.prefill_buckets, batch=args.batch_buckets)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - {"decode", "prefill"}
    if unknown:
        raise TuneError(f"unknown phase(s) {', '.join(sorted(unknown))}: use decode and/or prefill")
    buckets = {p: v for p, v in buckets.items() if p in phases}

    start = time.time()
    runner = verify_device = None
    if not args.list_kernels and not getattr(args, "validate", False):
        # Where to measure, checked first: no GPU and no tracker fails at once, before any work.
        runner, verify_device = _runner_for(args, target, arch)
    exported = export_model(config, quantization=scheme.name, target=target, buckets=buckets)
    prepared = prepare(exported.mod, target=target)
    task_list = attach_twins(prepared, tasks_of(prepared, buckets))
    kinds = {k.strip() for k in args.kinds.split(",") if k.strip()} if args.kinds else None
    if kinds:
        task_list = [t for t in task_list if t.kind in kinds]
    from .compile import is_gpu  # pylint: disable=import-outside-toplevel

    # The KV cache's prefill attention kernel (outside the partition) has its own search
    # (tuning.attention); it runs with the prefill phase on a GPU unless --kinds leaves it out.
    want_attention = is_gpu(target) and "prefill" in buckets and (kinds is None or "attention" in kinds)
    # Gathers (embedding rows) read what their indices say: MetaSchedule's random inputs index out
    # of range and crash the measurement, and a row copy has nothing to tune. Listed, not tuned.
    if getattr(args, "validate", False):
        from .database import database_path  # pylint: disable=import-outside-toplevel
        from .validate import validate_database  # pylint: disable=import-outside-toplevel

        path = database_path(args.database_dir, arch=arch, model=name, quantization=scheme.name)
        if not path.is_dir():
            raise TuneError(f"no database at {path}")
        report = validate_database(path, target=target)
        print(f"{path}: {report.line()}")
        for failure in report.failures:
            print("  " + failure)
        return 0 if report.ok() else 1
    if args.list_kernels:
        print(f"{name} {scheme.name} on {arch}: {len(task_list)} tasks ({time.time() - start:.1f} s)")
        print(table(task_list))
        print(summary(task_list))
        return 0
    task_list = [t for t in task_list if t.kind != "gather"]
    if not task_list and not want_attention:
        raise TuneError("no tasks to tune (check --phases / --kinds)")

    from .database import database_path, prune_best  # pylint: disable=import-outside-toplevel
    from .compile import dlight_rules  # pylint: disable=import-outside-toplevel
    from .tune import TuneTask, make_verifier, tune_tasks  # pylint: disable=import-outside-toplevel

    committed = database_path(args.database_dir, arch=arch, model=name, quantization=scheme.name)
    work_dir = Path(args.work_dir) if args.work_dir else Path(".tune-work") / committed.relative_to(args.database_dir)
    _seed_work_dir(work_dir, committed)
    per_task = args.trials_per_task
    total = args.trials if args.trials is not None else per_task * len(task_list)
    # One database collects several runs (decode buckets, then prefill...): its meta.json must
    # name every bucket and task it holds, not only the latest run's.
    from .database import read_meta  # pylint: disable=import-outside-toplevel

    previous = read_meta(committed) or {}
    all_buckets = {p: sorted(set(v) | set((previous.get("buckets") or {}).get(p, []))) for p, v in buckets.items()}
    for phase, values in (previous.get("buckets") or {}).items():
        all_buckets.setdefault(phase, sorted(values))
    all_tasks = sorted(set(previous.get("tasks") or []) | {t.name for t in task_list})
    if task_list:
        print(f"tuning {len(task_list)} tasks of {name}-{scheme.name} for {arch}: {total} trials "
              f"(<= {per_task} per task); records in {work_dir}", file=sys.stderr)
        tune_tasks(
            [TuneTask(name=t.name, mod=t.mod(), weight=float(t.weight), untuned_mod=t.untuned_mod()) for t in task_list],
            target=target,
            work_dir=work_dir,
            max_trials_global=total,
            max_trials_per_task=per_task,
            num_trials_per_iter=min(64, per_task),
            runner=runner,
            space=_space(args.space, target),
            seed=args.seed,
            untuned_rules=dlight_rules(target) if is_gpu(target) else None,
            progress=lambda p: print(p.format(), file=sys.stderr, flush=True),
            meta={"model": name, "quantization": scheme.name, "buckets": all_buckets, "run_buckets": buckets,
                  "config_hash": config.model_hash(), "trials": total, "trials_per_task": per_task,
                  "space": args.space},
            **({"num_tuning_cores": args.workers} if args.workers else {}),
        )
        # Tolerance of the numerical check, relative to the reference's max-abs: fp16 kernels differ
        # by accumulation order (K up to 3072: differences of ~1% of max-abs seen on an H200), fp32 ones barely.
        rtol = 3e-2 if scheme.activation_dtype == "float16" else 1e-4
        from .database import write_meta  # pylint: disable=import-outside-toplevel

        write_meta(work_dir, tasks=all_tasks)
        kept = prune_best(work_dir, out_path=committed,
                          verify=make_verifier(target=target, device_or_rpc=verify_device, rtol=rtol, atol=1e-5))
        if (work_dir / "untuned.json").is_file():  # compile skips records slower than the untuned kernel
            _merge_untuned(work_dir / "untuned.json", committed / "untuned.json")
        used = (read_meta(work_dir) or {}).get("trials_used")
        _record_run(committed, previous, {"buckets": buckets, "kinds": args.kinds or "all", "space": args.space,
                                          "trials": total, "trials_per_task": per_task, "trials_used": used})
        print(f"committed {sum(v is not None for v in kept.values())} verified best records to {committed}")
        _print_summary(work_dir, committed, task_list, target)
    if want_attention:
        _tune_attention(args, config=config, scheme=scheme, target=target, committed=committed,
                        lengths=buckets["prefill"], remote=isinstance(verify_device, tuple),
                        meta={"model": name, "quantization": scheme.name, "config_hash": config.model_hash()})
    return 0


def _tune_attention(args, *, config, scheme, target, committed: Path, lengths, remote: bool, meta: dict) -> None:
    """Search the KV cache's prefill attention kernel (``tuning.attention``) into ``committed``."""
    from .attention import tune_attention  # pylint: disable=import-outside-toplevel
    from .database import read_meta, write_meta  # pylint: disable=import-outside-toplevel

    if remote:
        print("attention: skipped: its search measures on a GPU of this machine, not over RPC "
              "(run tune --kinds attention on the GPU host)", file=sys.stderr)
        return
    previous = read_meta(committed) or {}
    doc = tune_attention(config, dtype=scheme.activation_dtype, target=target, out_dir=committed, lengths=lengths,
                         workers=args.workers, log=lambda m: print(m, file=sys.stderr, flush=True))
    if not previous:  # an attention-only run on a new database still names what it is for
        write_meta(committed, target=target, **meta)
    entry = doc["kernels"][0]
    _record_run(committed, previous, {"kinds": "attention", "lengths": list(lengths), "candidates": entry["candidates"],
                                      "speedup_geomean": round(1 / entry["best"]["score"], 3)})


def _record_run(committed: Path, previous: dict, run: dict) -> None:
    """Append this run to the committed meta.json's ``runs`` (the meta written by pruning
    describes only the latest run's settings; the history of runs is kept here)."""
    from .database import write_meta  # pylint: disable=import-outside-toplevel

    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run}
    runs = list(previous.get("runs") or []) + [run]
    write_meta(committed, runs=runs, trials=sum(int(r.get("trials") or 0) for r in runs))


def _print_summary(work_dir: Path, committed: Path, task_list, target) -> None:
    """Per task: untuned time (the dynamic build's kernel), best committed time, speedup."""
    from tabulate import tabulate  # pylint: disable=import-outside-toplevel

    from .database import open_database, record_latency_s  # pylint: disable=import-outside-toplevel

    path = work_dir / "untuned.json"
    untuned = json.loads(path.read_text()) if path.is_file() else {}
    db = open_database(committed, target=target)
    rows = []
    for t in task_list:
        base = (untuned.get(t.name) or {}).get("untuned_us")
        rec = db.query_tuning_record(t.mod(), target, "main")
        best = record_latency_s(rec) * 1e6 if rec is not None else None
        speedup = base / best if base and best else None
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        rows.append([t.name, t.kind, t.weight, fmt(base), fmt(best) if best is not None else "untuned kept", fmt(speedup)])
    print(tabulate(rows, headers=["task", "kind", "calls/step", "untuned us", "tuned us", "speedup"],
                   disable_numparse=True))
