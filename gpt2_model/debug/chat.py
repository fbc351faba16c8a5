"""DebugChat: greedy generation that dumps every kernel call of every step to ``.npz`` files."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import tvm

from ..config import get_config
from ..cuda_binary import load_module
from ..export import export_model
from ..loader import load_hf_params
from ..quantization import convert_params
from ..runtime import Engine
from ..workflow import load_engine as load_dist
from .dump import DebugError, Step, save_step, trace

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loading
def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face checkpoint directory (config.json + weights)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    )


def load_engine(
    model: str | Path,
    *,
    model_lib: str | Path,
    device: str = "cpu",
    quantization: str | None = None,
) -> Engine:
    """An engine for the debug tools, from a compiled library.

    Parameters
    ----------
    model : path
        A dist directory (``mlc-chat-config.json`` + converted weights) or a Hugging Face
        checkpoint directory.
    model_lib : path
        The compiled library (``gpt2k compile``). To build one from a Hugging Face directory
        on the fly use :func:`tuning.workflow.debug_engine` (what ``gpt2k debug-chat`` does).
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    quantization : str or None
        Weight format when ``model`` is a Hugging Face directory (default: the one of the
        library's ``.json`` sidecar, else ``q0f32``); ignored for a dist directory, whose chat
        config names it.
    """
    model = Path(model)
    if not model.exists():
        raise DebugError(f"no model at {model}")
    if model_lib is None:
        raise DebugError(f"no compiled library given for {model}: pass --model-lib")
    lib = Path(model_lib)
    if not lib.is_file():
        raise DebugError(f"no compiled library at {lib}")
    if not is_hf_dir(model):
        return load_dist(model, model_lib=lib, device=device)
    config = get_config(model)
    params = load_hf_params(model, config)
    # `gpt2k compile` writes LIB.so.json beside the library: its quantization and bucket entry points.
    side_path = Path(str(lib) + ".json")
    side = json.loads(side_path.read_text()) if side_path.is_file() else {}
    if quantization and side.get("quantization") and side["quantization"] != quantization:
        raise DebugError(f"{lib} was compiled for {side['quantization']}, not --quantization {quantization}")
    quantization = quantization or side.get("quantization") or "q0f32"
    exported = export_model(config, quantization=quantization, target=tvm.target.Target({"kind": "llvm"}),
                            buckets=side.get("buckets") or None)
    return Engine(exported=exported, executable=load_module(lib),
                  params=convert_params(params, exported.scheme), device=device)


def load_tokenizer(model: str | Path):
    """``tokenizers.Tokenizer`` from ``model/tokenizer.json``, or None when there is none."""
    path = Path(model)
    path = (path if path.is_dir() else path.parent) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    return Tokenizer.from_file(str(path))


# ----------------------------------------------------------------------------- DebugChat
@dataclasses.dataclass
class DebugChatResult:
    """What :meth:`DebugChat.generate` produced: new tokens, their text and the step folders."""

    prompt_ids: list[int]
    tokens: list[int]
    text: str | None
    step_dirs: list[Path]
    logits: list[np.ndarray]


class DebugChat:
    """Greedy generation with a dump of every kernel call.

    ``generate`` runs one prefill and ``generate_len - 1`` decode steps (``generate_len`` new
    tokens) and writes ``debug_dir/prefill/``, ``debug_dir/decode_1/``, ... Each folder holds
    ``f{i}_{kernel}.npz`` per kernel call in call order (``arg_0``, ``arg_1``, ...: every argument
    after the call ran, the last one is the output), ``logits.npz`` (``logits``: (vocab,) fp32)
    and ``manifest.json`` (kernel names, argument shapes/dtypes, which arguments are parameters).
    A step's folder starts with the token-embedding kernel (``take``) of its input tokens.
    """

    def __init__(self, engine, *, debug_dir: str | Path, tokenizer=None):
        self.engine = engine
        self.debug_dir = Path(debug_dir)
        self.tokenizer = tokenizer

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise DebugError("a text prompt needs tokenizer.json in the model directory; give token ids instead")
            return list(self.tokenizer.encode(prompt).ids)
        return [int(t) for t in prompt]

    def generate(self, prompt: str | Sequence[int], *, generate_len: int = 5) -> DebugChatResult:
        """Generate ``generate_len`` tokens greedily, dumping every step (see the class doc)."""
        if generate_len < 1:
            raise DebugError(f"generate_len must be >= 1, got {generate_len}")
        ids = self.encode(prompt)
        self.debug_dir.mkdir(parents=True, exist_ok=True)
        step_dirs: list[Path] = []

        def write(step: Step) -> None:
            step_dirs.append(save_step(step, self.debug_dir))
            logger.info("wrote %d kernel calls to %s", len(step.calls), step_dirs[-1])

        steps = trace(self.engine, ids, decode_steps=generate_len - 1, on_step=write)
        tokens = [s.next_token for s in steps]
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return DebugChatResult(ids, tokens, text, step_dirs, [s.logits for s in steps])
