"""``tune``: MetaSchedule tuning of GPT-2's kernels for one architecture, into databases/.

    tune --list-kernels                                       # the partition of the local arch, no tuning
    tune --arch sm_90 --trials-per-task 64                    # on a machine with that GPU
    tune --arch sm_86 --rpc-tracker HOST:9190 --rpc-key rtx3090   # measure on a remote card
    tune --arch cpu --model tiny --quantization q0f32 --trials-per-task 8   # this host's CPU (LLVM)
    tune --arch sm_90 --validate                              # check the committed database, change nothing

--arch defaults to the local GPU's arch (detected through NVML), and to cpu on a machine without
a CUDA GPU; the choice is printed. Running the same command again resumes: stored records
warm-start the search and only the remaining budget is spent. Results go to
DATABASE_DIR/ARCH/MODEL-QUANT/ with a meta.json; CPU databases, which only hold for the CPU that
measured them, go to DATABASE_DIR/local/cpu/MODEL-QUANT/ (git-ignored). One run at a time per
work directory: a second one is refused (or queues with --wait).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gpt2_model.cli_common import add_arch_arg, add_quantization_arg, positive_int_list

# Parsing and --help import nothing of TVM (≈10 s): tuning.config is plain Python, and the
# driver (which imports TVM) is imported in main() only after the arguments are parsed.
from .config import ATTENTION_TEMPLATES, KINDS, PHASES, SPACES, TuneConfig, TuneError

DEFAULT_PREFILL = "128,256,512,1024,2048"
DEFAULT_BATCH = "1,2,4,8,16,32,64"


def build_parser() -> argparse.ArgumentParser:
    """The ``tune`` argument parser."""
    p = argparse.ArgumentParser(prog="tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arch_arg(p)
    p.add_argument("--model", default="gpt2", help="preset (gpt2, gpt2-medium, ..., tiny) or a Hugging Face directory")
    add_quantization_arg(p, "q0f16")
    p.add_argument("--list-kernels", action="store_true", help="print the partition (kernels per bucket) and exit")
    p.add_argument("--validate", action="store_true",
                   help="check the committed database (every line parses, every record replays and builds for "
                        "--arch); reports every bad record, exits 1 if any, never modifies the database")
    p.add_argument("--repair", action="store_true",
                   help="move the committed database's bad lines to *.quarantine and exit")
    p.add_argument("--trials", type=int, default=None,
                   help="total measured trials over all tasks (default: --trials-per-task x tasks)")
    p.add_argument("--trials-per-task", type=int, default=64, help="cap on trials for one task (default 64)")
    p.add_argument("--prefill-buckets", type=positive_int_list, default=DEFAULT_PREFILL,
                   help=f"prefill chunk lengths to tune (default {DEFAULT_PREFILL}, within the context window)")
    p.add_argument("--batch-buckets", type=positive_int_list, default=DEFAULT_BATCH,
                   help=f"decode batch sizes to tune (default {DEFAULT_BATCH})")
    p.add_argument("--phases", default=",".join(PHASES), help="which phases to tune (default decode,prefill)")
    p.add_argument("--kinds", default=None,
                   help=f"only these kernel kinds: {', '.join(KINDS)} (attention: the KV cache's attention "
                        "kernels, searched on a local GPU: prefill with the prefill phase, decode with the decode "
                        "phase; norm-gemv: the fused layer norm + decode GEMV kernels, searched on a local GPU with the "
                        "decode phase; wgmma: the Hopper wgmma GEMMs of prefill chunks and of decode batches from 16 rows, "
                        "searched on a local sm_90 GPU, q0f16); default all")
    p.add_argument("--database-dir", type=Path, default=Path("databases"), help="root of the databases (default databases/)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="full record log, what resumes a run (default .tune-work/ + the database's path below "
                        "--database-dir)")
    p.add_argument("--wait", action="store_true",
                   help="when another tune holds the work directory or database: wait for it instead of exiting")
    p.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker to measure on remote cards")
    p.add_argument("--rpc-key", default=None, help="device key the RPC servers registered with")
    p.add_argument("--workers", type=int, default=None, help="parallel build workers (default: CPU count)")
    p.add_argument("--search-minutes", type=float, default=None, metavar="M",
                   help="stop starting new search batches after M minutes (the untuned baselines before "
                        "and the verification and commit after still run; a rerun resumes). Default: no limit")
    p.add_argument("--attention-templates", default=None, metavar="T,...",
                   help=f"prefill attention search: only these candidate families, of {', '.join(ATTENTION_TEMPLATES)} "
                        "(TVM's SIMT template, the wmma tensor-core one, its mma.sync register-resident variant, "
                        "the sm_90 wgmma flash-attention kernel); "
                        "TVM's own kernel and the database's stored choice are always timed with them. Default all")
    p.add_argument("--seed", type=int, default=0, help="random seed of the search (default 0)")
    p.add_argument("--space", default="llm", choices=SPACES,
                   help="design space: llm (our LLM-aware spaces + dlight + generic), generic (MetaSchedule's), "
                        "dlight (dlight's schedule only: a baseline database)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _default_arch() -> str:
    from gpt2_model.device import detect_cuda_arch  # pylint: disable=import-outside-toplevel  # NVML/TVM: only when --arch is missing

    arch = detect_cuda_arch()
    if arch is None:
        print("tune: --arch not given and no CUDA GPU found: tuning for this CPU (--arch cpu)", file=sys.stderr)
        return "cpu"
    print(f"tune: --arch not given: tuning for this machine's GPU, --arch {arch}", file=sys.stderr)
    return arch


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """The :class:`TuneConfig` of parsed arguments (``--arch`` detected when not given)."""
    as_list = lambda v: positive_int_list(v) if isinstance(v, str) else list(v)  # noqa: E731  (defaults are strings)
    return TuneConfig(
        arch=args.arch or _default_arch(), model=args.model, quantization=args.quantization, trials=args.trials,
        trials_per_task=args.trials_per_task, prefill_buckets=as_list(args.prefill_buckets),
        batch_buckets=as_list(args.batch_buckets), phases=args.phases, kinds=args.kinds,
        database_dir=args.database_dir, work_dir=args.work_dir, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
        workers=args.workers, search_minutes=args.search_minutes,
        attention_templates=args.attention_templates, seed=args.seed, space=args.space, list_kernels=args.list_kernels,
        validate=args.validate, repair=args.repair, wait=args.wait)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tune`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)  # bad options are refused here, before TVM is imported
        from .driver import run_tune  # pylint: disable=import-outside-toplevel  # imports TVM: after parsing (fast --help)
        from .lock import LockedError  # pylint: disable=import-outside-toplevel  # after parsing, as the driver

        try:
            return run_tune(config)
        except LockedError as err:
            raise TuneError(str(err)) from None
    except (TuneError, ValueError, FileNotFoundError) as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
