"""``tune``: MetaSchedule tuning of GPT-2's kernels for one architecture, into databases/.

    tune --arch sm_90 --list-kernels                      # the partition, no tuning
    tune --arch sm_90 --trials 2000                       # on a machine with that GPU
    tune --arch sm_86 --rpc-tracker HOST:9190 --rpc-key rtx3090   # measure on a remote card
    tune --arch cpu --model tiny --trials 64              # CPU (LLVM), this host's CPU

Running the same command again resumes: stored records warm-start the search and only the
remaining budget is spent. Results go to DATABASE_DIR/ARCH/MODEL-QUANT/ with a meta.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .partition import DEFAULT_BATCH_BUCKETS, DEFAULT_PREFILL_BUCKETS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True,
                   help="sm_70 sm_75 sm_80 sm_86 sm_89 sm_90 sm_100 sm_120, or cpu (this host, LLVM)")
    p.add_argument("--model", default="gpt2", help="preset (gpt2, gpt2-medium, ..., tiny) or a Hugging Face directory")
    p.add_argument("--quantization", default="q0f16", help="q0f32, q0f16 or q4f16_1 (default q0f16)")
    p.add_argument("--list-kernels", action="store_true", help="print the partition (kernels per bucket) and exit")
    p.add_argument("--validate", action="store_true",
                   help="check the committed database (replay + build every record for --arch) and exit")
    p.add_argument("--trials", type=int, default=None,
                   help="total measured trials over all tasks (default: 64 per task)")
    p.add_argument("--trials-per-task", type=int, default=64, help="cap on trials for one task (default 64)")
    p.add_argument("--prefill-buckets", type=_int_list, default=list(DEFAULT_PREFILL_BUCKETS),
                   help="prefill chunk lengths to tune (default 128,256,512,1024,2048, within the context window)")
    p.add_argument("--batch-buckets", type=_int_list, default=list(DEFAULT_BATCH_BUCKETS),
                   help="decode batch sizes to tune (default 1,2,4,8,16,32,64)")
    p.add_argument("--phases", default="decode,prefill", help="which phases to tune (default decode,prefill)")
    p.add_argument("--kinds", default=None, help="only these kernel kinds: gemv, gemm, reduction, elementwise, and attention (the KV "
                        "cache's prefill attention kernel, searched on a local GPU with the prefill phase); "
                        "default all")
    p.add_argument("--database-dir", type=Path, default=Path("databases"), help="root of the databases (default databases/)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="full record log, what resumes a run (default .tune-work/ARCH/MODEL-QUANT)")
    p.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker to measure on remote cards")
    p.add_argument("--rpc-key", default=None, help="device key the RPC servers registered with")
    p.add_argument("--workers", type=int, default=None, help="parallel build workers (default: CPU count)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the search (default 0)")
    p.add_argument("--space", default="llm", choices=["llm", "generic", "dlight"],
                   help="design space: llm (our LLM-aware spaces + dlight + generic), generic (MetaSchedule's), "
                        "dlight (dlight's schedule only: a baseline database)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .driver import TuneError, run_tune  # pylint: disable=import-outside-toplevel

    try:
        return run_tune(args)
    except (TuneError, ValueError, FileNotFoundError) as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
