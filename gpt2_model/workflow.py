"""MLC-style verbs that need no compiler: convert-weight, gen-config, list-params, and loading a
compiled library with its dist directory.

``compile`` (and everything else that builds) is :mod:`tuning.workflow`; the ``gpt2k`` CLI
(:mod:`tuning.gpt2k`) is a thin layer over both.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import tvm

from .config import GPT2Config, get_config, model_name
from .cuda_binary import load_module
from .export import export_model
from .loader import detect_source
from .quantization import QuantizationError, get_scheme
from .registry import get_model
from .runtime import Engine
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
    try:
        chat = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WorkflowError(f"{path} is not valid JSON ({err}): regenerate it with `gpt2k gen-config`") from None
    if not isinstance(chat, dict):
        raise WorkflowError(f"{path}: expected a JSON object, got {type(chat).__name__}")
    if chat.get("model_type") != "gpt2":
        raise WorkflowError(f"{path}: model_type {chat.get('model_type')!r} is not gpt2")
    for field in ("quantization", "model_config"):
        if field not in chat:
            raise WorkflowError(f"{path}: missing field {field!r} (regenerate it with `gpt2k gen-config`)")
    try:
        get_scheme(chat["quantization"])
    except QuantizationError as err:
        raise WorkflowError(f"{path}: field 'quantization': {err}") from None
    return chat, GPT2Config.from_dict(chat["model_config"])


def load_engine(dist: str | Path, *, model_lib: str | Path, device: str = "cpu", **kwargs):
    """An :class:`~gpt2_model.runtime.Engine` from a dist directory and a compiled library."""
    chat, config = read_chat_config(dist)
    dist_dir = Path(dist) if Path(dist).is_dir() else Path(dist).parent
    params = load_params(dist_dir)
    if not Path(model_lib).is_file():
        raise WorkflowError(f"no compiled library at {model_lib}: run `gpt2k compile` first")
    executable = load_module(model_lib)  # with its precompiled cubins (gpt2_model.cuda_binary)
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
