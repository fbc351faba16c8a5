"""Run options of ``bench``: one :class:`BenchConfig` instead of long keyword signatures.

The CLI turns its arguments into a :class:`BenchConfig` (``BenchConfig.from_args``) and the
library functions (:func:`bench.decode.run_decode`, :func:`bench.prefill.run_prefill`,
:func:`bench.kernels.run_kernels`) take it; no ``argparse.Namespace`` reaches library code.

Nothing here imports TVM or torch: ``bench --help`` builds its parser from this module's
neighbours and must print in well under two seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALL_VARIANTS",
    "TORCH_VARIANTS",
    "BenchConfig",
    "BenchError",
    "default_quantization",
    "default_variants",
    "parse_variants",
    "positive_ints",
]

#: Variant names. ``torch-compile`` is the gpt-fast-style peer (``bench/gptfast.py``: its own compact
#: GPT-2, static KV cache, ``torch.compile(mode="reduce-overhead", fullgraph=True)``); ``hf-compile``
#: is Hugging Face's model with a ``StaticCache`` under ``torch.compile``; ``torch-eager`` is HF eager.
ALL_VARIANTS = ("untuned", "tuned", "torch-eager", "torch-compile", "hf-compile")
TORCH_VARIANTS = ("torch-eager", "torch-compile", "hf-compile")
_ALIASES = {"torch": ("torch-eager", "torch-compile"), "eager": ("torch-eager",), "compile": ("torch-compile",),
            "gpt-fast": ("torch-compile",), "all": ALL_VARIANTS}


class BenchError(ValueError):
    """Bad benchmark options (one clear message for the CLI, exit status 2)."""


def positive_ints(value, *, name: str) -> list[int]:
    """``"1,8,32"`` / ``8`` / ``[1, 8]`` -> ``[1, 8, 32]`` (positive, de-duplicated, in order).

    Strings go through :func:`gpt2_model.cli_common.positive_int_list` (the one comma-list parser
    of the project); its error becomes a :class:`BenchError` naming ``--<name>``.
    """
    import argparse

    from gpt2_model.cli_common import positive_int_list

    if isinstance(value, bool):
        raise BenchError(f"--{name} needs positive integers, got {value!r}")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        try:
            items = positive_int_list(value)
        except argparse.ArgumentTypeError as e:
            raise BenchError(f"--{name}: {e}") from None
    else:
        items = [int(v) for v in value]
    if not items or any(v <= 0 for v in items):
        raise BenchError(f"--{name} needs positive integers, got {value!r}")
    return list(dict.fromkeys(items))


def default_variants(device_kind: str) -> list[str]:
    """``untuned,tuned,torch-eager`` on CPU (torch.compile takes minutes to compile there);
    ``untuned,tuned,torch-eager,torch-compile`` (the gpt-fast-style peer) on CUDA."""
    if device_kind == "cpu":
        return ["untuned", "tuned", "torch-eager"]
    return ["untuned", "tuned", "torch-eager", "torch-compile"]


def parse_variants(value, *, device_kind: str) -> list[str]:
    """``--variants``: comma list of :data:`ALL_VARIANTS`; ``torch`` = torch-eager and the
    gpt-fast-style torch-compile, ``all`` = every variant; ``None`` -> :func:`default_variants`."""
    if value is None:
        return default_variants(device_kind)
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for v in (x.strip() for x in items):
        if not v:
            continue
        if v in _ALIASES:
            out.extend(_ALIASES[v])
        elif v in ALL_VARIANTS:
            out.append(v)
        else:
            raise BenchError(f"unknown variant {v!r}; choose from {', '.join(ALL_VARIANTS)} (or torch, all)")
    if not out:
        raise BenchError("--variants is empty")
    return list(dict.fromkeys(out))


def default_quantization(device_kind: str) -> str:
    """``q0f16`` on CUDA; ``q0f32`` on CPUs, which have no native fp16 arithmetic (LLVM emulates it,
    several times slower than fp32), so the default run stays quick there."""
    return "q0f16" if device_kind == "cuda" else "q0f32"


@dataclass
class BenchConfig:
    """Options shared by ``bench decode``, ``bench prefill`` and ``bench kernels``.

    Attributes
    ----------
    model : str
        Preset (``gpt2`` ... ``tiny``) or a Hugging Face directory (config only; weights are
        random and seeded: throughput does not depend on their values).
    quantization : str or None
        ``q0f16`` / ``q0f32`` / ``q4f16_1``; ``None``: q0f16 on CUDA, q0f32 on CPU.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    arch : str or None
        ``sm_XX`` to build for; ``None``/``auto``: detected (``cpu`` on the CPU).
    variants : str, list or None
        See :func:`parse_variants`.
    cuda_graph : bool
        Whole-step CUDA graphs for the TVM token steps (``Engine(cuda_graph=True)``), and
        reduce-overhead for HF's torch.compile; no effect on CPU.
    repeats, warmup : int
        Kept and discarded runs per row.
    database_dir, database : str
        Root of the database tree; an explicit database directory for the tuned variant.
    cache_dir : str or None
        Compiled-library cache (default ``~/.cache/gpt2k/libs``).
    seed : int
        Seed of weights and tokens.
    peak_bw, peak_tflops : float or None
        Roofline overrides (GB/s, TFLOP/s).
    check : bool
        Check each variant's logits against Hugging Face fp32 before timing it.
    anatomy : bool
        Decode/prefill: also time the step's kernels one by one (graph-timed on CUDA) so the
        rows carry ``kernels_ms`` and ``overhead_ms`` (see ``bench/SCHEMA.md``).
    graph_kernels : bool
        Decode/prefill with the anatomy: also replay each TVM step's whole-step graph under
        ``torch.profiler`` (every kernel in it, the KV cache's included: :mod:`bench.step_kernels`).
        Off by default: the profiler may slow what runs after it (CUPTI), so use it in its own run.
    torch_threads : int or None
        Intra-op threads of the PyTorch peers on the CPU; ``None``: as many as TVM's thread pool.
    """

    model: str = "gpt2"
    quantization: str | None = None
    device: str = "auto"
    arch: str | None = None
    variants: Any = None
    cuda_graph: bool = True
    repeats: int = 5
    warmup: int = 1
    database_dir: str = "databases"
    database: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    peak_bw: float | None = None
    peak_tflops: float | None = None
    check: bool = True
    anatomy: bool = True
    graph_kernels: bool = False
    torch_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.repeats < 1 or self.warmup < 0:
            raise BenchError("--repeats must be >= 1 and --warmup >= 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise BenchError("--torch-threads must be >= 1")
        if self.arch == "auto":
            self.arch = None
        self.database_dir = str(self.database_dir)

    @classmethod
    def from_args(cls, args) -> "BenchConfig":
        """The fields of a parsed ``bench`` command line (unknown attributes are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def to_dict(self) -> dict[str, Any]:
        """JSON form, recorded as the result's ``args``."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        if not isinstance(d["variants"], (str, type(None))):
            d["variants"] = list(d["variants"])
        return d
