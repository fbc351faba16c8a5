"""``gpt2k``: the umbrella command (MLC-style verbs, plus ``tune`` / ``bench`` / debug tools).

    gpt2k list-params gpt2 --quantization q0f16
    gpt2k convert-weight HF_DIR --quantization q0f16 -o DIST
    gpt2k gen-config HF_DIR --quantization q0f16 -o DIST
    gpt2k compile DIST/mlc-chat-config.json --device cuda -o DIST/gpt2-cuda.so
    gpt2k compile DIST/mlc-chat-config.json --device cuda --arch sm_90 -o DIST/gpt2-sm90.so
    gpt2k generate --model DIST --model-lib DIST/gpt2-cuda.so --device cuda --prompt-ids 464,3290 --gen-len 32
    gpt2k tune ...      (same as `tune ...`)
    gpt2k bench ...     (same as `bench ...`)

The verbs that build (compile, and the debug verbs given a Hugging Face directory without
--model-lib) go through the tuning package; the rest only need gpt2_model. TVM is imported when a
verb runs, not to print --help.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from gpt2_model.cli_common import (
    add_arch_arg,
    add_device_arg,
    add_gen_len_arg,
    add_quantization_arg,
    int_list,
)

from .cli import main as tune_main
from .debug_cli import register_debug_commands


def build_parser() -> argparse.ArgumentParser:
    """The ``gpt2k`` argument parser (imports no TVM)."""
    parser = argparse.ArgumentParser(prog="gpt2k", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("list-params", help="list the exported parameters (name, shape, dtype)")
    p.add_argument("model", help="preset name (gpt2, gpt2-medium, ..., tiny) or a Hugging Face directory")
    add_quantization_arg(p)

    p = sub.add_parser("convert-weight", help="convert a Hugging Face checkpoint to parameter shards")
    p.add_argument("model_dir", type=Path, help="local Hugging Face directory (config.json + weights)")
    add_quantization_arg(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="output (dist) directory")

    p = sub.add_parser("gen-config", help="write mlc-chat-config.json and copy tokenizer files")
    p.add_argument("model_dir", type=Path)
    add_quantization_arg(p)
    p.add_argument("--context-window-size", type=int, default=None, help="default: n_positions")
    p.add_argument("--prefill-chunk-size", type=int, default=None, help="default: min(context window, 2048)")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: 64")
    p.add_argument("-o", "--output", type=Path, required=True)

    p = sub.add_parser("compile", help="compile the model library (untuned, or with a tuned database)")
    p.add_argument("chat_config", type=Path, help="DIST/mlc-chat-config.json (or DIST)")
    add_device_arg(p)
    add_arch_arg(p)
    p.add_argument("--database", type=Path, default=None, help="tuned database directory to apply")
    p.add_argument("--database-dir", type=Path, default=Path("databases"),
                   help="where to look for DATABASE_DIR/ARCH/MODEL-QUANT when --database is not given")
    p.add_argument("--no-tuning", action="store_true", help="build the untuned (dlight) library")
    p.add_argument("--cuda-graph", action="store_true", help="capture decode into CUDA graphs")
    p.add_argument("-o", "--output", type=Path, required=True, help="output library (.so)")

    p = sub.add_parser("generate", help="greedy generation with a compiled library (prints tokens/s)")
    p.add_argument("--model", type=Path, required=True, help="dist directory (mlc-chat-config.json + weights)")
    p.add_argument("--model-lib", type=Path, required=True, help="compiled library (`gpt2k compile`)")
    add_device_arg(p)
    p.add_argument("--prompt-ids", type=int_list, default=None, help="comma-separated token ids")
    add_gen_len_arg(p, default=16)
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (needs tokenizer.json in the dist dir)")

    register_debug_commands(sub)

    sub.add_parser("tune", help="tune kernels (see `tune --help`)", add_help=False)
    sub.add_parser("bench", help="benchmarks (see `bench --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpt2k`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tune":
        return tune_main(argv[1:])
    if argv and argv[0] == "bench":
        # bench sits above tuning: run its CLI in a child interpreter instead of importing it here.
        return subprocess.call([sys.executable, "-m", "bench.cli", *argv[1:]])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"gpt2k {args.verb}: error: {err}", file=sys.stderr)
        return 1


def _run(args) -> int:
    # The verbs import TVM (through gpt2_model's export/runtime and tuning's compile) when they run,
    # not when the parser is built: `gpt2k --help` stays fast.
    # pylint: disable=import-outside-toplevel
    if args.verb == "list-params":
        from gpt2_model.workflow import list_params

        for name, shape, dtype in list_params(args.model, quantization=args.quantization):
            print(name, list(shape), dtype)
    elif args.verb == "convert-weight":
        from gpt2_model.workflow import convert_weight

        print(convert_weight(args.model_dir, quantization=args.quantization, output=args.output))
    elif args.verb == "gen-config":
        from gpt2_model.workflow import gen_config

        print(gen_config(args.model_dir, quantization=args.quantization, output=args.output,
                         context_window_size=args.context_window_size, prefill_chunk_size=args.prefill_chunk_size,
                         max_batch_size=args.max_batch_size))
    elif args.verb == "compile":
        from .workflow import compile_model

        print(compile_model(args.chat_config, device=args.device, arch=args.arch, output=args.output,
                            database=args.database, no_tuning=args.no_tuning, cuda_graph=args.cuda_graph,
                            database_dir=args.database_dir))
    elif args.verb == "generate":
        return _generate(args)
    else:
        return int(args.handler(args) or 0)
    return 0


def _tokenizer(model_dir: Path):
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel  # optional dependency

    return Tokenizer.from_file(str(path))


def _generate(args) -> int:
    from gpt2_model.workflow import load_engine  # pylint: disable=import-outside-toplevel  # imports TVM

    tok = _tokenizer(args.model if args.model.is_dir() else args.model.parent)
    if args.prompt_ids is not None:
        ids = args.prompt_ids
    elif args.prompt is not None:
        if tok is None:
            raise ValueError("a text prompt needs tokenizer.json in the model directory; use --prompt-ids")
        ids = tok.encode(args.prompt).ids
    else:
        raise ValueError("give a prompt text or --prompt-ids")
    engine = load_engine(args.model, model_lib=args.model_lib, device=args.device)
    start = time.perf_counter()
    out = engine.generate(ids, args.gen_len, stop_at_eos=True)
    seconds = time.perf_counter() - start
    print("tokens:", ",".join(map(str, out)))
    if tok is not None:
        print("text:", tok.decode(out))
    # Wall time of the whole generate call: the prompt's prefill plus len(out) - 1 decode steps.
    print(f"{len(out)} tokens in {seconds:.4g} s: {len(out) / seconds:.1f} tokens/s "
          f"(prompt {len(ids)} tokens, device {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
