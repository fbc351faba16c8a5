"""Build a runnable :class:`~gpt2_model.runtime.Engine`: export, compile (tuned database or not), load.

This is the building half of what used to be ``Engine.build`` / ``Engine.from_hf`` /
``Engine.from_config``; it lives in ``tuning`` because compiling goes through
:mod:`tuning.compile` (``gpt2_model`` only loads and runs a built library).

Typical use::

    from tuning.engine import engine_from_hf
    engine = engine_from_hf("path/to/hf_dir", device="cpu", quantization="q0f32")
    engine.generate([464, 3290], max_new_tokens=8)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tvm.target import Target

from gpt2_model.config import GPT2Config, get_config
from gpt2_model.device import arch_for_device
from gpt2_model.loader import load_hf_params, random_params
from gpt2_model.quantization import convert_params
from gpt2_model.runtime import Engine

from .compile import build_model
from .targets import make_target

__all__ = ["build_engine", "engine_from_config", "engine_from_hf", "target_for"]


def target_for(device: str, arch: str | None = None) -> Target:
    """The build target of ``device``.

    Parameters
    ----------
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    arch : str or None
        CUDA architecture (``sm_90``, ...); None detects the local GPU's. Ignored for ``cpu``.

    Returns
    -------
    tvm.target.Target

    Raises
    ------
    gpt2_model.device.DeviceError
        A malformed device, or a CUDA device without ``arch`` whose architecture cannot be
        detected here (the message names ``--arch``).
    """
    return make_target(arch_for_device(device, arch))


def build_engine(  # pylint: disable=too-many-arguments
    config: GPT2Config,
    params_fp32: dict[str, np.ndarray] | None,
    *,
    quantization: str,
    device: str = "cpu",
    arch: str | None = None,
    database=None,
    cuda_graph: bool = False,
    seed: int = 0,
    **engine_kwargs,
) -> Engine:
    """Export, compile and load ``config``.

    Parameters
    ----------
    config : GPT2Config
    params_fp32 : dict or None
        fp32 weights in our naming; None makes seeded random weights (:func:`random_params`).
    quantization : str
        ``q0f32``, ``q0f16`` or ``q4f16_1``.
    device, arch : str
        See :func:`target_for`.
    database : path or None
        Tuned database directory to apply (None: the untuned build).
    cuda_graph : bool
        Build with ``relax.backend.use_cuda_graph`` and run the token steps of bucket shapes as
        whole-step CUDA graphs (``Engine(cuda_graph=True)``; GPU only).
    seed : int
        Seed of the random weights when ``params_fp32`` is None.
    **engine_kwargs
        Passed to :class:`~gpt2_model.runtime.Engine` (``max_batch_size``, ``page_size``, ...).

    Returns
    -------
    Engine
        With ``engine.build_result`` set to the :class:`tuning.compile.BuildResult`.
    """
    target = target_for(device, arch)
    result = build_model(config, quantization=quantization, target=target, database=database, cuda_graph=cuda_graph)
    exported = result.exported
    params = random_params(exported, seed=seed) if params_fp32 is None else convert_params(params_fp32, exported.scheme)
    engine = Engine(exported=exported, executable=result.executable, params=params, device=device, target=target,
                    cuda_graph=cuda_graph, **engine_kwargs)
    engine.build_result = result
    return engine


def engine_from_hf(model_dir: str | Path, *, device: str = "cpu", quantization: str = "q0f32", **kwargs) -> Engine:
    """Compile and load a local Hugging Face checkpoint directory (keywords as :func:`build_engine`)."""
    config = get_config(model_dir)
    params = load_hf_params(model_dir, config)
    return build_engine(config, params, quantization=quantization, device=device, **kwargs)


def engine_from_config(config: GPT2Config | str, *, quantization: str = "q0f16", device: str = "cpu",
                       seed: int = 0, **kwargs) -> Engine:
    """A preset name (or a :class:`GPT2Config`) with seeded random weights.

    Throughput does not depend on the weights' values; use :func:`engine_from_hf` for a checkpoint.
    """
    if not isinstance(config, GPT2Config):
        config = get_config(config)
    return build_engine(config, None, quantization=quantization, device=device, seed=seed, **kwargs)
