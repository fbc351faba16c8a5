"""The verbs that build: ``gpt2k compile`` and the on-the-fly build of the debug tools.

They compose :mod:`gpt2_model` (config, export, dist directories, the runtime) with
:mod:`tuning.compile` (apply a tuned database, dlight, lowering), so they live in ``tuning``:
``gpt2_model`` never imports ``tuning``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gpt2_model.config import get_config
from gpt2_model.cuda_binary import precompile
from gpt2_model.debug.chat import is_hf_dir
from gpt2_model.debug.chat import load_engine as load_debug_engine
from gpt2_model.export import export_model
from gpt2_model.loader import load_hf_params
from gpt2_model.quantization import convert_params
from gpt2_model.runtime import Engine
from gpt2_model.workflow import read_chat_config

from .apply import find_database
from .compile import build, build_model
from .engine import target_for

logger = logging.getLogger(__name__)

__all__ = ["compile_model", "debug_engine"]


def compile_model(  # pylint: disable=too-many-arguments
    chat_config: str | Path,
    *,
    device: str = "cpu",
    arch: str | None = None,
    output: str | Path,
    database: str | Path | None = None,
    no_tuning: bool = False,
    cuda_graph: bool = False,
    database_dir: str | Path = "databases",
) -> Path:
    """Compile the model described by ``chat_config`` into a shared library at ``output``.

    Parameters
    ----------
    chat_config : path
        ``DIST/mlc-chat-config.json`` or its directory (``gpt2k gen-config``).
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    arch : str or None
        CUDA architecture; None detects the local GPU's (an error naming ``--arch`` without one).
    output : path
        The library (``.so``); ``output + ".json"`` gets a sidecar (target, quantization, database,
        bucket entry points, coverage) that the loaders read.
    database : path or None
        Tuned database directory to apply; None looks up ``database_dir/ARCH/MODEL-QUANT``.
    no_tuning : bool
        Build the untuned library (dlight on GPUs) even when a database exists.
    cuda_graph : bool
        Capture decode into CUDA graphs.
    database_dir : path
        Root of the databases for the lookup.

    Returns
    -------
    Path
        ``output``.
    """
    chat, config = read_chat_config(chat_config)
    target = target_for(device, arch)
    db = None
    if not no_tuning:
        db = find_database(
            database=database, database_dir=database_dir, target=target,
            model=chat.get("model_name", "gpt2"), quantization=chat["quantization"],
        )
    result = build_model(config, quantization=chat["quantization"], target=target, database=db, cuda_graph=cuda_graph)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result.executable.export_library(str(output))
    cuda_binary = precompile(result.executable, output, target)  # the CUDA source compiled now, not at each load
    # Sidecar: what the loader needs to know about the library (its bucket entry points).
    side = {"target": str(target.kind.name), "arch": target.attrs.get("arch", "") if target.kind.name == "cuda" else "",
            "quantization": chat["quantization"], "database": str(db) if db else None,
            "buckets": result.buckets,
            "coverage": result.coverage.lines() if result.coverage else None,
            "attention": result.attention, "cuda_binary": cuda_binary}
    Path(str(output) + ".json").write_text(json.dumps(side, indent=1, default=str))
    if result.coverage:
        for line in result.coverage.lines():
            print(line)
        for line in result.attention:
            print(f"tuned attention kernel {line}")
    else:
        print(f"untuned build ({'--no-tuning' if no_tuning else 'no tuned database found'})")
    logger.info("wrote %s (%s, %s)", output, target.kind.name, "tuned" if db else "untuned")
    return output


def debug_engine(
    model: str | Path,
    *,
    model_lib: str | Path | None = None,
    device: str = "cpu",
    quantization: str | None = None,
) -> Engine:
    """An engine for the debug verbs: a compiled library, or an untuned build made now.

    Parameters
    ----------
    model : path
        A dist directory or a Hugging Face checkpoint directory.
    model_lib : path or None
        The compiled library. None is allowed only with a Hugging Face directory: the library is
        then built now, untuned, for ``device``.
    device : str
        ``cpu``, ``cuda`` or ``cuda:N`` (a CUDA build uses the local GPU's detected arch).
    quantization : str or None
        Weight format for a Hugging Face directory (default ``q0f32``).

    Returns
    -------
    Engine
    """
    if model_lib is not None or not is_hf_dir(model):
        return load_debug_engine(model, model_lib=model_lib, device=device, quantization=quantization)
    config = get_config(model)
    params = load_hf_params(model, config)
    target = target_for(device)
    exported = export_model(config, quantization=quantization or "q0f32", target=target)
    executable = build(exported, target=target)
    return Engine(exported=exported, executable=executable, params=convert_params(params, exported.scheme),
                  device=device, target=target)
