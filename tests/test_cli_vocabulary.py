"""One vocabulary across ``gpt2k``, ``tune`` and ``bench`` (issue 15 item 4), read from their --help.

The same flag names the same thing everywhere it applies (``--gen-len``, ``--quantization``,
``--device``, ``--arch``, ``--trials-per-task``); the old spellings (``--max-new-tokens``,
``--generate-len``) are not advertised; ``--arch`` is never required (it defaults to the local
GPU's arch); every flag used in a help example exists on the command it names, and examples say
``--trials-per-task``, not ``--trials``.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pytest

from .clihelp import console_scripts, run_in_fresh_interpreter

#: (program, subcommand or None) -> the shared flags that apply to it.
APPLIES = {
    ("tune", None): {"--arch", "--quantization", "--trials-per-task"},
    ("bench", "decode"): {"--gen-len", "--quantization", "--device", "--arch"},
    ("bench", "prefill"): {"--quantization", "--device", "--arch"},
    ("bench", "kernels"): {"--quantization", "--device", "--arch"},
    ("gpt2k", "list-params"): {"--quantization"},
    ("gpt2k", "convert-weight"): {"--quantization"},
    ("gpt2k", "gen-config"): {"--quantization"},
    ("gpt2k", "compile"): {"--device", "--arch"},
    ("gpt2k", "generate"): {"--device", "--gen-len"},
    ("gpt2k", "debug-chat"): {"--device", "--gen-len"},
    ("gpt2k", "compare-hf"): {"--device", "--quantization"},
    ("gpt2k", "compare-builds"): {"--device"},
}
OLD_NAMES = ("--max-new-tokens", "--generate-len", "--generate-length")
PROGRAMS = ("gpt2k", "tune", "bench")


@lru_cache(maxsize=None)
def _runs(prog: str) -> dict:
    """{subcommand or None: result of `prog [sub] --help`}, all from one fresh interpreter."""
    entry = console_scripts()[prog]
    subs = [None] + sorted(sub for p, sub in APPLIES if p == prog and sub is not None)
    calls = [(prog, entry, ([sub] if sub else []) + ["--help"]) for sub in subs]
    return dict(zip(subs, run_in_fresh_interpreter(calls)["results"]))


def help_text(prog: str, sub) -> str:
    """The output of `prog [sub] --help`, checked to be a help that exited 0."""
    res = _runs(prog)[sub]
    assert res["code"] in (0, None), f"{' '.join(res['argv'])} exited {res['code']}:\n{res['stdout'][-2000:]}"
    assert "usage:" in res["stdout"], f"{' '.join(res['argv'])} printed no usage:\n{res['stdout'][:500]}"
    return res["stdout"]


def helps(prog: str) -> dict:
    """{subcommand or None: --help text} of one program."""
    return {sub: help_text(prog, sub) for sub in _runs(prog)}


def defined_flags(text: str) -> set[str]:
    """The long options an argparse help lists (lines ``  -x, --name VALUE   text``)."""
    flags = set()
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            flags.update(re.findall(r"--[\w][\w-]*", invocation))
    return flags


def example_lines(text: str, prog: str) -> list[str]:
    """Lines of a help text that show a command line of `prog` (``    tune --arch sm_90 ...``)."""
    return [line.strip().split("#")[0] for line in text.splitlines()
            if re.match(rf"^\s*{re.escape(prog)} [\w-]", line) and not line.lstrip().startswith("usage:")]


@pytest.mark.parametrize("prog,sub", sorted(APPLIES, key=str), ids=lambda x: str(x))
def test_shared_flag_names_exist_where_they_apply(prog, sub):
    text = help_text(prog, sub)
    missing = APPLIES[(prog, sub)] - defined_flags(text)
    assert not missing, f"`{prog} {sub or ''} --help` lacks {sorted(missing)}:\n{text}"


@pytest.mark.parametrize("prog", PROGRAMS)
def test_old_names_are_not_advertised(prog):
    for sub, text in helps(prog).items():
        old = [name for name in OLD_NAMES if re.search(rf"{name}(?![\w-])", text)]
        assert not old, f"`{prog} {sub or ''} --help` advertises {old} (the shared name is --gen-len)"


@pytest.mark.parametrize("prog", PROGRAMS)
def test_help_examples_use_existing_flags_and_trials_per_task(prog):
    texts = helps(prog)
    examples = [line for text in texts.values() for line in example_lines(text, prog)]
    if prog in ("gpt2k", "tune", "bench"):
        assert examples, f"`{prog} --help` shows no example command line"
    for line in examples:
        words = line.split()
        sub = words[1] if len(words) > 1 and words[1] in texts else None
        if prog == "gpt2k" and len(words) > 1 and words[1] in ("tune", "bench"):
            continue  # forwarded to the other program; its own help is checked there
        used = set(re.findall(r"(?<![\w-])--[\w][\w-]*", line))
        assert not re.search(r"--trials(?![\w-])", line), f"`{prog}` help example uses --trials: {line!r}"
        if sub is None and prog == "gpt2k":
            continue  # a verb whose help is not fetched here
        if prog == "bench" and sub is None:
            continue
        unknown = used - defined_flags(texts[sub])
        assert not unknown, f"`{prog}` help example {line!r} uses {sorted(unknown)}, not options of `{prog} {sub or ''}`"


@pytest.mark.parametrize("prog,sub", [(p, s) for (p, s), flags in sorted(APPLIES.items(), key=str) if "--arch" in flags],
                         ids=lambda x: str(x))
def test_arch_is_optional_and_says_its_default(prog, sub):
    text = help_text(prog, sub)
    usage = text.split("\n\n")[0]
    assert re.search(r"\[--arch[ \]]", usage), f"`{prog} {sub or ''}`: --arch is required in the usage:\n{usage}"
    option = re.search(r"^ {2}--arch.*?(?=^ {2}-|\n\n|\Z)", text, re.M | re.S)
    assert option and re.search(r"default", option.group(0), re.I), (
        f"`{prog} {sub or ''} --help` does not say what --arch defaults to:\n{option.group(0) if option else text}")
