"""``bench``: measure GPT-2 on TVM, untuned vs tuned vs PyTorch, on this machine.

Commands
--------
``bench decode``   token generation throughput (``tg<gen>@b<batch>``), batch / prompt sweeps
``bench prefill``  prompt processing throughput (``pp<seq_len>``), seq-len / batch sweeps
``bench kernels``  every kernel of one decode or prefill step: untuned vs tuned vs cuBLAS

Defaults work on a fresh machine: random (seeded) weights of the preset, the device detected,
the tuned variant read from ``databases/<arch>/<model>-<quant>/`` when it exists (otherwise the
run says so and prints the ``tune`` command that would create it). Libraries are cached under
``~/.cache/gpt2k/libs`` so a second run does not rebuild. Progress goes to stderr, the table
to stdout; ``--json`` keeps every sample and the environment (schema: ``bench/SCHEMA.md``).

Exit status: 0 when at least one row was measured, 1 when none was, 2 for bad options or an
unusable database (e.g. one tuned for another architecture).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

# Only argparse-level modules at import time: TVM and torch take seconds to import, and
# `bench --help` (and a bad option) must answer at once. The commands import them when they run.
from gpt2_model.cli_common import (QUANTIZATION_HELP, add_arch_arg, add_device_arg, add_gen_len_arg,
                                   add_quantization_arg)

from .config import BenchConfig, BenchError

__all__ = ["main", "build_parser"]


def _on_off(value: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def _add_common(p: argparse.ArgumentParser, *, variants: bool = True) -> None:
    g = p.add_argument_group("model and build")
    g.add_argument("--model", default="gpt2",
                   help="preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, tiny) or a Hugging Face "
                        "model directory (its config.json; weights are random and seeded: throughput does not "
                        "depend on their values). Default: gpt2")
    add_quantization_arg(g, default=None, help=QUANTIZATION_HELP + ". Default: q0f16 on CUDA, q0f32 on CPU "
                                                                    "(no native fp16 arithmetic)")
    add_device_arg(g, default="auto", allow_auto=True)
    add_arch_arg(g)
    g.add_argument("--cuda-graph", type=_on_off, default=True, metavar="on|off",
                   help="run each TVM token step (decode step, prefill chunk of a bucket length) as one CUDA "
                        "graph, replayed after its first run (rows then carry 'graph ms': the step's graph "
                        "replayed alone); and use torch.compile's reduce-overhead mode for hf-compile. No effect "
                        "on CPU. Default: on")
    g.add_argument("--database-dir", default="databases",
                   help="root of the tuning databases; the tuned variant uses "
                        "<database-dir>/<arch>/<model>-<quantization>/. Default: databases")
    g.add_argument("--database", default=None, metavar="DIR",
                   help="use this database directory for the tuned variant instead of the lookup")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="compiled-library cache (keyed by config, quantization, target, database hash, TVM "
                        "version). Default: $GPT2K_CACHE_DIR or ~/.cache/gpt2k/libs")
    if variants:
        g.add_argument("--variants", default=None,
                       help="comma list of untuned, tuned, torch-eager (HF eager), torch-compile (gpt-fast-style "
                            "PyTorch GPT-2 under torch.compile), hf-compile (HF model + StaticCache under "
                            "torch.compile); 'torch' = torch-eager,torch-compile, 'all' = everything. Default: "
                            "untuned,tuned,torch-eager on CPU, plus torch-compile on CUDA. 'tuned' is dropped "
                            "with a note when no database exists")
        g.add_argument("--no-check", dest="check", action="store_false",
                       help="skip the logits check of each variant against Hugging Face fp32 before timing")
        g.add_argument("--no-anatomy", dest="anatomy", action="store_false",
                       help="skip the step anatomy (each kernel of the step timed alone: kernels ms and "
                            "overhead = wall - kernels)")
        g.add_argument("--graph-kernels", action="store_true",
                       help="also profile each TVM step's whole-step CUDA graph (torch.profiler): every kernel in "
                            "it, the KV cache's included, and the gaps between them (with or without --no-anatomy, which only "
                            "skips timing each kernel alone). Its own run: the profiler may slow what is timed after it")
        g.add_argument("--torch-threads", type=int, default=None, metavar="N",
                       help="intra-op threads of the PyTorch peers on the CPU. Default: TVM's thread-pool size")
    m = p.add_argument_group("measurement")
    m.add_argument("--repeats", type=int, default=5,
                   help="measured runs per row (median and p20/p80 over them). Default: 5")
    m.add_argument("--warmup", type=int, default=1, help="discarded runs before measuring. Default: 1")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens. Default: 0")
    m.add_argument("--peak-bw", type=_positive_float, default=None, metavar="GB/S",
                   help="memory bandwidth roofline in GB/s (overrides the card table in bench/env.py)")
    m.add_argument("--peak-tflops", type=_positive_float, default=None, metavar="TFLOP/S",
                   help="compute roofline in TFLOP/s for the model's dtype (overrides the table)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH",
                   help="write every sample and the environment as JSON (checked writable before measuring)")
    o.add_argument("--plot", default=None, metavar="PATH.png",
                   help="plot tok/s against the swept axis, one line per variant (needs matplotlib)")
    o.add_argument("--format", dest="tablefmt", default="github",
                   help="table style for tabulate (github, plain, simple, pipe, ...). Default: github")
    o.add_argument("--quiet", action="store_true", help="no progress messages on stderr")


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` argument parser (subcommands decode, prefill, kernels)."""
    parser = argparse.ArgumentParser(
        prog="bench",
        description="Measure GPT-2 on TVM: untuned vs tuned vs PyTorch, on this machine, in one run.\n\n"
                    + __doc__.split("\n\n")[2].replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  bench decode --batch 1,8,32 --plot tg.png\n  bench prefill --seq-len 128,512,1024\n"
               "  bench kernels --phase decode --batch 8\n  bench decode --model tiny --device cpu --gen-len 4",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{decode,prefill,kernels}")

    d = sub.add_parser("decode", help="token generation throughput (tg)",
                       description="Decode throughput: BATCH sequences prefilled with PROMPT_LEN tokens, then "
                                   "GEN_LEN decode steps timed one by one. Reports tok/s, wall and GPU ms per step, "
                                   "achieved GB/s (weights + KV read per step) and % of the memory roofline.")
    d.add_argument("--batch", default="8", help="batch size(s), comma list for a sweep (1,8,32). Default: 8")
    d.add_argument("--prompt-len", default="128", help="prompt length(s), comma list. Default: 128")
    add_gen_len_arg(d, default=128, help="decode steps per run")
    _add_common(d)

    p = sub.add_parser("prefill", help="prompt processing throughput (pp)",
                       description="Prefill throughput: BATCH empty sequences prefilled with SEQ_LEN tokens "
                                   "(chunked at the model's prefill chunk). Reports tok/s, ms, GPU ms, TFLOP/s "
                                   "and % of the card's dense peak.")
    p.add_argument("--seq-len", default="128,512,1024", help="prompt length(s), comma list. Default: 128,512,1024")
    p.add_argument("--batch", default="1", help="sequences per prefill, comma list. Default: 1")
    _add_common(p)

    k = sub.add_parser("kernels", help="per-kernel untuned vs tuned vs cuBLAS",
                       description="Every kernel of one decode step (--phase decode --batch B) or one prefill "
                                   "chunk (--phase prefill --seq-len S): untuned and tuned time, speedup, cuBLAS "
                                   "time for GEMM/GEMV (CUDA + torch), achieved GB/s or TFLOP/s and % of peak, "
                                   "share of the step (weighted by calls per step).")
    k.add_argument("--phase", choices=("decode", "prefill"), default="decode", help="Default: decode")
    k.add_argument("--batch", type=int, default=8, help="decode batch bucket. Default: 8")
    k.add_argument("--seq-len", type=int, default=1024, help="prefill chunk bucket. Default: 1024")
    k.add_argument("--top", type=int, default=None, help="show only the N heaviest kernels in the table")
    _add_common(k, variants=False)
    return parser


def _log(quiet: bool):
    if quiet:
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _check_output(path: str, flag: str) -> None:
    """Fail before measuring when ``path`` cannot be written (the samples would be lost after the run)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BenchError(f"{flag} {path}: is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BenchError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BenchError(f"{flag} {path}: not writable (permission denied)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bench`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's usage error (2) or --help (0): returned like every other status
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    log = _log(args.quiet)
    try:
        if args.json:
            _check_output(args.json, "--json")
        if args.plot:
            if args.command == "kernels":
                log("--plot applies to decode/prefill sweeps; ignored for kernels")
                args.plot = None
            else:
                _check_output(args.plot, "--plot")
                try:
                    import matplotlib  # noqa: F401
                except ImportError:
                    raise BenchError("--plot needs matplotlib: pip install 'gpt2-kernels[plot]'") from None
        cfg = BenchConfig.from_args(args)
        from . import report, tables
        from .build import DatabaseError

        try:
            if args.command == "decode":
                from .decode import run_decode

                result = run_decode(cfg, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, log=log)
            elif args.command == "prefill":
                from .prefill import run_prefill

                result = run_prefill(cfg, seq_len=args.seq_len, batch=args.batch, log=log)
            else:
                from .kernels import run_kernels

                result = run_kernels(cfg, phase=args.phase, batch=args.batch, seq_len=args.seq_len, log=log)
        except DatabaseError as e:
            raise BenchError(str(e)) from None
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    if args.command == "kernels":
        print(tables.format_kernel_table(result, tablefmt=args.tablefmt, top=args.top))
    else:
        print(tables.format_table(result, tablefmt=args.tablefmt))
    if args.json:
        report.write_json(result, args.json)
        log(f"wrote {args.json}")
    if args.plot:
        try:
            log(f"wrote {report.plot_sweep(result, args.plot)}")
        except (RuntimeError, ValueError) as e:
            print(f"bench: cannot plot: {e}", file=sys.stderr)
    return 0 if any(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
