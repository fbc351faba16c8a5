"""MLC-style verbs as a Python API: convert-weight, gen-config, compile, load.

The CLI (:mod:`gpt2_model.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import tvm

from .config import GPT2Config, get_config, model_name
from .export import export_model
from .quantization import get_scheme
from .registry import get_model
from .weights import load_params, save_params

logger = logging.getLogger(__name__)

CHAT_CONFIG = "mlc-chat-config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


class WorkflowError(ValueError):
    """Bad input to a verb (missing files, inconsistent dist directory)."""


def convert_weight(model_dir: str | Path, *, quantization: str, output: str | Path) -> Path:
    """HF checkpoint -> parameter shards + tensor-cache.json in ``output``."""
    model_dir = Path(model_dir)
    config = get_config(model_dir)
    entry = get_model("gpt2")
    scheme = get_scheme(quantization)
    from .loader import detect_source  # pylint: disable=import-outside-toplevel

    source, _ = detect_source(model_dir)
    params = entry.source[source](model_dir, config)
    stored = entry.quantize[scheme.name](params)
    # Store in the exported calling order, so the runtime can stream them straight in.
    order = export_model(config, quantization=scheme.name, target=tvm.target.Target({"kind": "llvm"})).param_names
    path = save_params({name: stored[name] for name in order}, output)
    logger.info("wrote %d parameters to %s", len(order), output)
    return path


def gen_config(model_dir: str | Path, *, quantization: str, output: str | Path, **overrides) -> Path:
    """Write ``mlc-chat-config.json`` (and copy tokenizer files) into ``output``."""
    model_dir = Path(model_dir)
    config = get_config(model_dir, **{k: v for k, v in overrides.items() if v is not None})
    scheme = get_scheme(quantization)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output / name)
            copied.append(name)
    if not copied:
        logger.info("no tokenizer files in %s: prompts must be given as token ids", model_dir)
    chat = {
        "model_type": "gpt2",
        "quantization": scheme.name,
        "model_config": config.to_dict(),
        "context_window_size": config.context_window_size,
        "prefill_chunk_size": config.prefill_chunk_size,
        "max_batch_size": config.max_batch_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tokenizer_files": copied,
        "model_name": model_name(model_dir),
    }
    path = output / CHAT_CONFIG
    path.write_text(json.dumps(chat, indent=2))
    return path


def read_chat_config(path: str | Path) -> tuple[dict, GPT2Config]:
    """(the chat config dict, its GPT2Config) from a dist dir or its mlc-chat-config.json."""
    path = Path(path)
    if path.is_dir():
        path = path / CHAT_CONFIG
    if not path.is_file():
        raise WorkflowError(f"no {CHAT_CONFIG} at {path}: run `gpt2k gen-config` first")
    chat = json.loads(path.read_text())
    if chat.get("model_type") != "gpt2":
        raise WorkflowError(f"{path}: model_type {chat.get('model_type')!r} is not gpt2")
    return chat, GPT2Config.from_dict(chat["model_config"])


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

    The tuned database is ``database`` when given; otherwise ``database_dir/ARCH/MODEL-QUANT`` when
    it exists (unless ``no_tuning``). Without one the build is the untuned default (dlight on GPUs).
    """
    from tuning.compile import build_model  # pylint: disable=import-outside-toplevel

    from tuning.engine import target_for  # pylint: disable=import-outside-toplevel

    chat, config = read_chat_config(chat_config)
    target = target_for(device, arch)
    db = None
    if not no_tuning:
        from tuning.apply import find_database  # pylint: disable=import-outside-toplevel

        db = find_database(
            database=database, database_dir=database_dir, target=target,
            model=chat.get("model_name", "gpt2"), quantization=chat["quantization"],
        )
    result = build_model(config, quantization=chat["quantization"], target=target, database=db, cuda_graph=cuda_graph)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result.executable.export_library(str(output))
    # Sidecar: what the loader needs to know about the library (its bucket entry points).
    side = {"target": str(target.kind.name), "arch": target.attrs.get("arch", "") if target.kind.name == "cuda" else "",
            "quantization": chat["quantization"], "database": str(db) if db else None,
            "buckets": result.buckets,
            "coverage": result.coverage.lines() if result.coverage else None,
            "attention": result.attention}
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


def load_engine(dist: str | Path, *, model_lib: str | Path, device: str = "cpu", **kwargs):
    """An :class:`~gpt2_model.runtime.Engine` from a dist directory and a compiled library."""
    from .runtime import Engine  # pylint: disable=import-outside-toplevel

    chat, config = read_chat_config(dist)
    dist_dir = Path(dist) if Path(dist).is_dir() else Path(dist).parent
    params = load_params(dist_dir)
    if not Path(model_lib).is_file():
        raise WorkflowError(f"no compiled library at {model_lib}: run `gpt2k compile` first")
    executable = tvm.runtime.load_module(str(model_lib))
    side_path = Path(str(model_lib) + ".json")
    buckets = json.loads(side_path.read_text()).get("buckets", {}) if side_path.is_file() else {}
    # Parameter order/shapes do not depend on the target: export once for the spec and buckets.
    exported = export_model(config, quantization=chat["quantization"], target=tvm.target.Target({"kind": "llvm"}),
                            buckets=buckets)
    return Engine(exported=exported, executable=executable, params=params, device=device, **kwargs)


def list_params(model: str | Path, *, quantization: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every exported parameter of ``model`` (preset or HF dir)."""
    config = get_config(model)
    return export_model(config, quantization=quantization, target=tvm.target.Target({"kind": "llvm"})).param_specs()
