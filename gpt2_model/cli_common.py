"""Argument vocabulary shared by the three CLIs (``gpt2k``, ``tune``, ``bench``).

One spelling per concept: ``--quantization`` (default q0f16), ``--gen-len`` (the old spellings
``--max-new-tokens`` / ``--generate-len`` still parse, hidden from ``--help``), ``--device``,
``--arch`` (default: the local GPU's, detected; ``cpu`` on the CPU), and comma lists parsed by
:func:`int_list`.

Pure argparse: nothing here imports TVM, so building a parser (and ``--help``) stays fast.
"""

from __future__ import annotations

import argparse

__all__ = [
    "ARCH_HELP",
    "QUANTIZATION_HELP",
    "QUANTIZATION_NAMES",
    "add_arch_arg",
    "add_device_arg",
    "add_gen_len_arg",
    "add_quantization_arg",
    "int_list",
    "positive_int_list",
]

# The scheme names of gpt2_model.quantization.QUANTIZATIONS, spelled here so that a parser does not
# import TVM (tests/gpt2_model/test_cli_common.py checks the two agree).
QUANTIZATION_NAMES = ("q0f16", "q0f32", "q4f16_1")
QUANTIZATION_HELP = "weight format: q0f32 (fp32), q0f16 (fp16), q4f16_1 (4-bit groups of 32, fp16 scales)"
ARCH_HELP = ("architecture to build for and to look up the tuned database of: sm_70 sm_75 sm_80 sm_86 sm_89 "
             "sm_90 sm_100 sm_120, or cpu. Default: the local GPU's arch, detected; on CPU 'cpu'")


def _parse_ints(text: str, *, minimum: int, what: str) -> list[int]:
    items = [x.strip() for x in str(text).split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    try:
        values = [int(x) for x in items if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``: non-negative integers (token ids, sizes), at least one.

    Empty items (``"1,,8"``, a trailing comma) are skipped; anything else that is not an integer
    raises :class:`argparse.ArgumentTypeError`, which argparse prints as one usage error.
    """
    return _parse_ints(text, minimum=0, what="non-negative integers")


def positive_int_list(text: str) -> list[int]:
    """Like :func:`int_list`, for sizes that must be positive (batch sizes, bucket lengths)."""
    return _parse_ints(text, minimum=1, what="positive integers")


def add_quantization_arg(parser, default: str | None = "q0f16", *, help: str | None = None):  # pylint: disable=redefined-builtin
    """``--quantization {q0f16,q0f32,q4f16_1}``; ``default`` is named in the help."""
    text = help or QUANTIZATION_HELP
    if default is not None and "default" not in text.lower():
        text += f". Default: {default}"
    return parser.add_argument("--quantization", choices=QUANTIZATION_NAMES, default=default, help=text)


def add_gen_len_arg(parser, default: int = 16, *, help: str | None = None):  # pylint: disable=redefined-builtin
    """``--gen-len N`` (new tokens per sequence); ``--max-new-tokens`` and ``--generate-len`` are
    hidden aliases of the same option (``dest="gen_len"``)."""
    text = help or "new tokens to generate"
    parser.add_argument("--gen-len", dest="gen_len", type=int, default=default, help=f"{text}. Default: {default}")
    # Old spellings: same destination, not shown in --help.
    return parser.add_argument("--max-new-tokens", "--generate-len", dest="gen_len", type=int, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)


def add_device_arg(parser, default: str = "cpu", *, allow_auto: bool = False):
    """``--device``: cpu, cuda or cuda:N (and ``auto`` when ``allow_auto``)."""
    choices = "auto (CUDA device 0 if there is one, else cpu), cpu, cuda or cuda:N" if allow_auto \
        else "cpu, cuda or cuda:N"
    return parser.add_argument("--device", default=default, help=f"{choices}. Default: {default}")


def add_arch_arg(parser, default: str | None = None):
    """``--arch``; ``None`` means detect the local GPU's arch (``cpu`` for CPU builds)."""
    return parser.add_argument("--arch", default=default, metavar="ARCH", help=ARCH_HELP)
