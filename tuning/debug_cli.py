"""The debug verbs of ``gpt2k``: debug-chat, compare-hf, compare-builds (see :mod:`gpt2_model.debug`).

``register_debug_commands(subparsers)`` adds them to the umbrella parser; each sets
``args.handler`` (called with the parsed args; returns the exit code). They live in ``tuning``
because, given a Hugging Face directory and no ``--model-lib``, they build the library first
(:func:`tuning.workflow.debug_engine`); the recording and comparing is :mod:`gpt2_model.debug`.

Building the parser imports no TVM (``gpt2k --help`` stays fast): the handlers import the
heavy modules when they run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2_model.cli_common import QUANTIZATION_NAMES, add_device_arg, add_gen_len_arg, int_list

MODEL_HELP = ("what to load: a dist directory (mlc-chat-config.json + weights from `gpt2k convert-weight`; "
              "needs --model-lib) or a local Hugging Face GPT-2 directory (config.json + model.safetensors / "
              "pytorch_model.bin; without --model-lib it is compiled now, untuned). Not a hub name: download first")


def _model_args(p: argparse.ArgumentParser, *, lib: bool = True) -> None:
    p.add_argument("--model", type=Path, required=True, help=MODEL_HELP)
    if lib:
        p.add_argument("--model-lib", type=Path, default=None,
                       help="compiled library; optional with a Hugging Face directory (built now, untuned)")
    p.add_argument("--quantization", choices=QUANTIZATION_NAMES, default=None,
                   help="weight format when --model is a Hugging Face directory. Default: the library's "
                        "(its .json sidecar), else q0f32")
    add_device_arg(p)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-ids", type=int_list, default=None,
                   help="comma-separated prompt token ids (default: 8 fixed ids below the vocab size)")
    p.add_argument("--decode-steps", type=int, default=1, help="decode steps after the prefill (default 1)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance per row (default: by dtype)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this file")


def register_debug_commands(subparsers) -> None:
    """Add ``debug-chat``, ``compare-hf`` and ``compare-builds`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "debug-chat", help="greedy generation that dumps every kernel call to .npz files",
        description="Writes DEBUG_DIR/prefill/, DEBUG_DIR/decode_1/, ...: f{i}_{kernel}.npz per kernel call "
                    "(arg_0..arg_N, the last is the output), logits.npz and manifest.json.")
    _model_args(p)
    p.add_argument("--debug-dir", type=Path, required=True, help="where the step folders are written")
    add_gen_len_arg(p, default=5)
    p.add_argument("--prompt-ids", type=int_list, default=None, help="comma-separated prompt token ids")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text (needs tokenizer.json in the model directory)")
    p.set_defaults(handler=_debug_chat)

    p = subparsers.add_parser(
        "compare-hf", help="per-layer error of our build against transformers' GPT2LMHeadModel",
        description="Runs the prompt through transformers (forward hooks) and our build and prints max-abs and "
                    "relative error per layer, marking the first row beyond tolerance. Exit code 1 when a row "
                    "fails.")
    _model_args(p)
    _compare_args(p)
    p.set_defaults(handler=_compare_hf)

    p = subparsers.add_parser(
        "compare-builds", help="kernel-by-kernel comparison of two compiled libraries (e.g. untuned vs tuned)",
        description="Runs both libraries on identical inputs; each kernel of B is also re-run on the inputs "
                    "recorded from A so the first failing kernel is the culprit. Exit code 1 when a row fails.")
    _model_args(p, lib=False)
    p.add_argument("--lib-a", type=Path, required=True, help="reference library")
    p.add_argument("--lib-b", type=Path, required=True, help="library under test")
    p.add_argument("--no-replay", action="store_true", help="compare outputs only (no per-kernel replay)")
    _compare_args(p)
    p.set_defaults(handler=_compare_builds)


def _default_ids(engine) -> list[int]:
    vocab = engine.config.vocab_size
    return [t % vocab for t in (464, 3290, 318, 257, 1310, 290, 262, 1110)]


def _report(result, json_path: Path | None) -> int:
    print(result.table())
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(result.to_json())
    return 0 if result.ok else 1


def _debug_chat(args) -> int:
    # Handlers import TVM-heavy modules when they run, so that building the parser stays fast.
    from gpt2_model.debug import DebugChat, DebugError, load_tokenizer  # pylint: disable=import-outside-toplevel

    from .workflow import debug_engine  # pylint: disable=import-outside-toplevel

    tokenizer = load_tokenizer(args.model)
    if args.prompt_ids is not None:
        prompt = args.prompt_ids
    elif args.prompt is not None:
        if tokenizer is None:
            raise DebugError(f"a text prompt needs tokenizer.json in {args.model}; use --prompt-ids")
        prompt = args.prompt
    else:
        raise DebugError("give a prompt text or --prompt-ids")
    engine = debug_engine(args.model, model_lib=args.model_lib, device=args.device, quantization=args.quantization)
    chat = DebugChat(engine, debug_dir=args.debug_dir, tokenizer=tokenizer)
    result = chat.generate(prompt, generate_len=args.gen_len)
    print("prompt ids:", ",".join(map(str, result.prompt_ids)))
    print("tokens:", ",".join(map(str, result.tokens)))
    if result.text is not None:
        print("text:", result.text)
    for folder in result.step_dirs:
        print("dumped", folder)
    return 0


def _compare_hf(args) -> int:
    from gpt2_model.debug import DebugError, compare_hf  # pylint: disable=import-outside-toplevel
    from gpt2_model.debug.chat import is_hf_dir  # pylint: disable=import-outside-toplevel

    from .workflow import debug_engine  # pylint: disable=import-outside-toplevel

    if not is_hf_dir(args.model):
        raise DebugError(f"compare-hf needs a Hugging Face directory (config.json + weights), got {args.model}")
    from transformers import GPT2LMHeadModel  # pylint: disable=import-outside-toplevel

    engine = debug_engine(args.model, model_lib=args.model_lib, device=args.device, quantization=args.quantization)
    hf_model = GPT2LMHeadModel.from_pretrained(str(args.model)).float().eval()
    result = compare_hf(engine=engine, hf_model=hf_model, prompt_ids=args.prompt_ids or _default_ids(engine),
                        decode_steps=args.decode_steps, rtol=args.rtol)
    return _report(result, args.json)


def _compare_builds(args) -> int:
    from gpt2_model.debug import compare_builds, load_engine  # pylint: disable=import-outside-toplevel

    engine_a = load_engine(args.model, model_lib=args.lib_a, device=args.device, quantization=args.quantization)
    engine_b = load_engine(args.model, model_lib=args.lib_b, device=args.device, quantization=args.quantization)
    result = compare_builds(engine_a=engine_a, engine_b=engine_b, prompt_ids=args.prompt_ids or _default_ids(engine_a),
                            decode_steps=args.decode_steps, rtol=args.rtol, replay=not args.no_replay)
    return _report(result, args.json)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m tuning.debug_cli VERB ...``), same verbs as ``gpt2k``."""
    parser = argparse.ArgumentParser(prog="gpt2-debug")
    sub = parser.add_subparsers(dest="verb", required=True)
    register_debug_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"{args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
