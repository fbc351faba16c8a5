"""``TuneConfig``: the options of one ``tune`` run, checked before any work starts.

The CLI (:mod:`tuning.cli`) fills it from argparse; library code (:func:`tuning.driver.run_tune`)
takes it, never an ``argparse.Namespace``. Nothing here imports TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["ATTENTION_TEMPLATES", "KINDS", "PHASES", "SPACES", "TuneConfig", "TuneError"]

PHASES = ("decode", "prefill")
#: Kernel kinds of the partition (``tuning.partition.classify``) plus the KV cache's attention.
KINDS = ("gemv", "gemm", "reduction", "elementwise", "attention", "norm-gemv", "wgmma")
SPACES = ("llm", "generic", "dlight")
#: Families of prefill attention candidates (``tuning.attention``): TVM's SIMT template, the wmma
#: tensor-core template, its register-resident mma.sync variant.
ATTENTION_TEMPLATES = ("simt", "tc", "mma", "fa")


class TuneError(ValueError):
    """A tune request that cannot run here (bad option, no device, bad tracker, lock held, ...)."""


def _names(value, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = tuple(x.strip() for x in items if x and x.strip())
    unknown = sorted(set(items) - set(allowed))
    if unknown:
        raise TuneError(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    if not items:
        raise TuneError(f"{flag}: give at least one of {', '.join(allowed)}")
    return items


@dataclass
class TuneConfig:  # pylint: disable=too-many-instance-attributes
    """Options of one ``tune`` run (see ``tune --help`` for each).

    ``__post_init__`` normalizes the comma lists and refuses bad values with one
    :class:`TuneError` line naming the flag, before any model is exported.
    """

    arch: str
    model: str = "gpt2"
    quantization: str = "q0f16"
    trials: int | None = None
    trials_per_task: int = 64
    prefill_buckets: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    batch_buckets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    phases: tuple[str, ...] = PHASES
    kinds: tuple[str, ...] | None = None
    database_dir: Path = Path("databases")
    work_dir: Path | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    workers: int | None = None
    seed: int = 0
    search_minutes: float | None = None
    attention_templates: tuple[str, ...] | None = None
    space: str = "llm"
    list_kernels: bool = False
    validate: bool = False
    repair: bool = False
    wait: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.trials_per_task, int) or self.trials_per_task <= 0:
            raise TuneError(f"--trials-per-task must be a positive integer, got {self.trials_per_task}")
        if self.trials is not None and (not isinstance(self.trials, int) or self.trials <= 0):
            raise TuneError(f"--trials must be a positive integer, got {self.trials}")
        if self.workers is not None and self.workers <= 0:
            raise TuneError(f"--workers must be a positive integer, got {self.workers}")
        if self.search_minutes is not None and not self.search_minutes > 0:
            raise TuneError(f"--search-minutes must be a positive number, got {self.search_minutes}")
        for flag, values in (("--prefill-buckets", self.prefill_buckets), ("--batch-buckets", self.batch_buckets)):
            if not values or any(not isinstance(v, int) or v <= 0 for v in values):
                raise TuneError(f"{flag}: expected positive integers, got {values}")
        self.phases = _names(self.phases, PHASES, "--phases")
        if self.kinds is not None:
            self.kinds = _names(self.kinds, KINDS, "--kinds")
        if self.attention_templates is not None:
            self.attention_templates = _names(self.attention_templates, ATTENTION_TEMPLATES, "--attention-templates")
        if self.space not in SPACES:
            raise TuneError(f"--space: unknown {self.space} (choose from {', '.join(SPACES)})")
        if self.rpc_tracker and not self.rpc_key:
            raise TuneError("--rpc-tracker needs --rpc-key (the key the RPC servers registered with)")
        if self.rpc_key and not self.rpc_tracker:
            raise TuneError("--rpc-key needs --rpc-tracker HOST:PORT")
        if sum((self.list_kernels, self.validate, self.repair)) > 1:
            raise TuneError("--list-kernels, --validate and --repair are separate actions: pass one")
        self.database_dir = Path(self.database_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir is not None else None

    def display(self) -> str:
        """The options as one line (printed once at the start of a run)."""
        skip = {"list_kernels", "validate", "repair"}
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in skip or value is None or value is False:
                continue
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            parts.append(f"{f.name.replace('_', '-')}={value}")
        return "tune: " + " ".join(parts)
