"""``gpt2k``: the umbrella command (MLC-style verbs, plus ``tune`` / ``bench`` / debug tools).

    gpt2k list-params gpt2 --quantization q0f16
    gpt2k convert-weight HF_DIR --quantization q0f16 -o DIST
    gpt2k gen-config HF_DIR --quantization q0f16 -o DIST
    gpt2k compile DIST/mlc-chat-config.json --device cuda --arch sm_90 -o DIST/gpt2-cuda.so
    gpt2k generate --model DIST --model-lib DIST/gpt2-cuda.so --device cuda --prompt-ids 464,3290
    gpt2k tune ...      (same as `tune ...`)
    gpt2k bench ...     (same as `bench ...`)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .quantization import QUANTIZATIONS


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def _tokenizer(model_dir: Path):
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    return Tokenizer.from_file(str(path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2k", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    quant = dict(choices=sorted(QUANTIZATIONS), default="q0f16",
                 help="weight format: q0f32 (fp32), q0f16 (fp16), q4f16_1 (4-bit groups of 32, fp16 scales)")

    p = sub.add_parser("list-params", help="list the exported parameters (name, shape, dtype)")
    p.add_argument("model", help="preset name (gpt2, gpt2-medium, ..., tiny) or a Hugging Face directory")
    p.add_argument("--quantization", **quant)

    p = sub.add_parser("convert-weight", help="convert a Hugging Face checkpoint to parameter shards")
    p.add_argument("model_dir", type=Path, help="local Hugging Face directory (config.json + weights)")
    p.add_argument("--quantization", **quant)
    p.add_argument("-o", "--output", type=Path, required=True, help="output (dist) directory")

    p = sub.add_parser("gen-config", help="write mlc-chat-config.json and copy tokenizer files")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--quantization", **quant)
    p.add_argument("--context-window-size", type=int, default=None, help="default: n_positions")
    p.add_argument("--prefill-chunk-size", type=int, default=None, help="default: min(context window, 2048)")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: 64")
    p.add_argument("-o", "--output", type=Path, required=True)

    p = sub.add_parser("compile", help="compile the model library (untuned, or with a tuned database)")
    p.add_argument("chat_config", type=Path, help="DIST/mlc-chat-config.json (or DIST)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--arch", default=None, help="CUDA arch (sm_70 ... sm_120); default: the local GPU's")
    p.add_argument("--database", type=Path, default=None, help="tuned database directory to apply")
    p.add_argument("--database-dir", type=Path, default=Path("databases"),
                   help="where to look for DATABASE_DIR/ARCH/MODEL-QUANT when --database is not given")
    p.add_argument("--no-tuning", action="store_true", help="build the untuned (dlight) library")
    p.add_argument("--cuda-graph", action="store_true", help="capture decode into CUDA graphs")
    p.add_argument("-o", "--output", type=Path, required=True, help="output library (.so)")

    p = sub.add_parser("generate", help="greedy generation with a compiled library")
    p.add_argument("--model", type=Path, required=True, help="dist directory (mlc-chat-config.json + weights)")
    p.add_argument("--model-lib", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-ids", type=_ids, default=None, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (needs tokenizer.json in the dist dir)")

    try:
        from .debug import register_debug_commands  # pylint: disable=import-outside-toplevel
    except ImportError:
        pass
    else:
        register_debug_commands(sub)

    sub.add_parser("tune", help="tune kernels (see `tune --help`)", add_help=False)
    sub.add_parser("bench", help="benchmarks (see `bench --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("tune", "bench"):
        if argv[0] == "tune":
            from tuning.cli import main as sub_main  # pylint: disable=import-outside-toplevel
        else:
            from bench.cli import main as sub_main  # pylint: disable=import-outside-toplevel
        return sub_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verb is None:
        parser.print_help()
        return 2
    from . import workflow  # pylint: disable=import-outside-toplevel

    try:
        if args.verb == "list-params":
            specs = workflow.list_params(args.model, quantization=args.quantization)
            for name, shape, dtype in specs:
                print(name, list(shape), dtype)
        elif args.verb == "convert-weight":
            print(workflow.convert_weight(args.model_dir, quantization=args.quantization, output=args.output))
        elif args.verb == "gen-config":
            print(workflow.gen_config(args.model_dir, quantization=args.quantization, output=args.output,
                                      context_window_size=args.context_window_size,
                                      prefill_chunk_size=args.prefill_chunk_size,
                                      max_batch_size=args.max_batch_size))
        elif args.verb == "compile":
            print(workflow.compile_model(args.chat_config, device=args.device, arch=args.arch, output=args.output,
                                         database=args.database, no_tuning=args.no_tuning,
                                         cuda_graph=args.cuda_graph, database_dir=args.database_dir))
        elif args.verb == "generate":
            return _generate(args, workflow)
        elif hasattr(args, "handler"):
            return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"gpt2k {args.verb}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _generate(args, workflow) -> int:
    tok = _tokenizer(args.model if args.model.is_dir() else args.model.parent)
    if args.prompt_ids is not None:
        ids = args.prompt_ids
    elif args.prompt is not None:
        if tok is None:
            raise ValueError("a text prompt needs tokenizer.json in the model directory; use --prompt-ids")
        ids = tok.encode(args.prompt).ids
    else:
        raise ValueError("give a prompt text or --prompt-ids")
    engine = workflow.load_engine(args.model, model_lib=args.model_lib, device=args.device)
    out = engine.generate(ids, args.max_new_tokens, stop_at_eos=True)
    print("tokens:", ",".join(map(str, out)))
    if tok is not None:
        print("text:", tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
