"""What every ``bench`` command resolves before measuring: device, arch, target, model config,
quantization, tuning database, variants, environment snapshot and roofline.

Setup resolves, in order: the device (``--device``, through ``gpt2_model.device``), the
architecture (``--arch``; ``cpu`` on CPUs), the build target (``gpt2_model.runtime.target_for``),
the model config (preset or HF directory), the tuning database for (arch, model, quantization)
(none -> untuned only, with the ``tune`` command that would make one; another arch's database ->
refused), the variants, the environment snapshot and the roofline peak.

All variants share one seeded fp32 weight set: the TVM engines convert it to the stored form of
the quantization; the PyTorch peers get the same weights back in float (dequantized when the
scheme is quantized), so every variant computes the same function.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import env as envmod
from .build import DatabaseInfo, locate_database
from .config import TORCH_VARIANTS, BenchConfig, BenchError, default_quantization, parse_variants
from .peers import torch_available
from .timing import Timer, make_timer

__all__ = ["Setup", "setup", "env_and_peak", "log_stderr", "resolve_target"]


def log_stderr(msg: str) -> None:
    """Default progress sink: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Setup:
    """Everything resolved before the first variant runs."""

    cfg: BenchConfig
    model_label: str
    config: Any
    quantization: str
    dtype: str
    device: envmod.DeviceSpec
    arch: str
    target: Any
    database: DatabaseInfo | None
    variants: list[str]
    env: dict[str, Any]
    peak: envmod.Peak | None
    timer: Timer
    notes: list[str] = field(default_factory=list)
    _params_fp32: dict[str, np.ndarray] | None = None
    _ref_logits: np.ndarray | None = None

    @property
    def seed(self) -> int:
        """Seed of the weights and tokens."""
        return self.cfg.seed

    @property
    def params_fp32(self) -> dict[str, np.ndarray]:
        """The shared seeded fp32 weights (made on first use)."""
        if self._params_fp32 is None:
            from .peers import random_params

            self._params_fp32 = random_params(self.config, seed=self.seed)
        return self._params_fp32

    def peer_params(self) -> dict[str, np.ndarray]:
        """The float weights the TVM engines effectively compute with (dequantized if quantized)."""
        from gpt2_model.quantization import convert_params, dequantize_params, get_scheme

        scheme = get_scheme(self.quantization)
        if scheme.kind == "none":
            return self.params_fp32
        return dequantize_params(convert_params(self.params_fp32, scheme))


def resolve_target(cfg: BenchConfig):
    """``(device, arch, target, config, model_label, quantization, scheme)`` of a run.

    Raises
    ------
    BenchError
        Unknown model/quantization, bad device or arch.
    """
    from gpt2_model.config import ConfigError, get_config, model_name
    from gpt2_model.quantization import QuantizationError, get_scheme
    from tuning.engine import target_for

    try:
        dev = envmod.resolve_device(cfg.device)
        config = get_config(cfg.model)
        quantization = cfg.quantization or default_quantization(dev.kind)
        scheme = get_scheme(quantization)
    except (ValueError, ConfigError, QuantizationError) as e:
        raise BenchError(str(e)) from None
    if dev.kind == "cpu" and cfg.arch not in (None, "cpu"):
        raise BenchError(f"--arch {cfg.arch} applies to CUDA devices; this run is on the CPU (use --device cuda)")
    if dev.kind == "cuda" and cfg.arch is not None and not str(cfg.arch).startswith("sm_"):
        raise BenchError(f"--arch must be sm_XX (e.g. sm_90) on a CUDA device, got {cfg.arch!r}")
    try:
        arch = envmod.arch_of(dev, cfg.arch)
        target = target_for(dev.name, None if dev.kind == "cpu" else arch)
    except ValueError as e:  # unknown arch (tuning.targets.UnknownArchError), undetectable GPU
        raise BenchError(f"--arch {cfg.arch or 'auto'}: {e}") from None
    return dev, arch, target, config, model_name(cfg.model), quantization, scheme


def setup(cfg: BenchConfig, *, log: Callable[[str], None] = log_stderr) -> Setup:
    """Resolve device, arch, target, config, database, variants, environment and peak.

    Raises
    ------
    BenchError
        Unknown model/quantization/variant, bad device or arch.
    bench.build.DatabaseError
        The database found for the tuned variant belongs to another arch (or is corrupt).
    """
    dev, arch, target, config, label, quantization, scheme = resolve_target(cfg)
    vs = parse_variants(cfg.variants, device_kind=dev.kind)
    notes: list[str] = []
    db = None
    if "tuned" in vs:
        db, msg = locate_database(database_dir=cfg.database_dir, model=label, quantization=quantization,
                                target=target, explicit=cfg.database, model_hash=config.model_hash())
        if db is None:
            notes.append(msg)
            log(msg)
            vs = [v for v in vs if v != "tuned"]
        else:
            log(f"tuned variant uses database {db.path} (hash {db.hash[:12]})")
    elif cfg.database is not None:
        raise BenchError("--database given but the tuned variant is not among --variants")
    if any(v in TORCH_VARIANTS for v in vs) and not torch_available():
        notes.append("torch/transformers not importable: PyTorch peer rows are skipped")
    if scheme.kind != "none" and any(v in TORCH_VARIANTS for v in vs):
        notes.append(f"PyTorch peers run the dequantized {quantization} weights in {scheme.activation_dtype} "
                     "(unquantized kernels, same function)")
    env, peak = env_and_peak(dev, database=db.to_dict() if db else None, arch=arch, dtype=scheme.activation_dtype,
                             peak_bw=cfg.peak_bw, peak_tflops=cfg.peak_tflops, notes=notes)
    return Setup(cfg=cfg, model_label=label, config=config, quantization=quantization,
                 dtype=scheme.activation_dtype, device=dev, arch=arch, target=target, database=db,
                 variants=vs, env=env, peak=peak, timer=make_timer(dev), notes=notes)


def env_and_peak(dev, *, database, arch: str, dtype: str, peak_bw, peak_tflops, notes: list[str]):
    """The run's environment (NVML / CPU, versions, database) and the roofline used for percentages."""
    env = envmod.collect_env(dev, arch=arch, database=database)
    try:
        peak = envmod.resolve_peak(env, dtype=dtype, peak_bw=peak_bw, peak_tflops=peak_tflops)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if peak is None:
        notes.append("no peak figures for this device: % of roofline omitted (set --peak-bw/--peak-tflops)")
    return env, peak
