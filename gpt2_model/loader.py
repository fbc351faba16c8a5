"""Load a local Hugging Face GPT-2 checkpoint into our parameter names.

Sources (MLC-LLM's names): ``huggingface-safetensor`` (``model.safetensors`` or shards listed in
``model.safetensors.index.json``) and ``huggingface-torch`` (``pytorch_model.bin``, needs torch).

The mapping is an identity on names (both sides use HF's module names) plus:
- the optional ``transformer.`` prefix (``GPT2LMHeadModel`` saves with it, ``GPT2Model`` without);
- Conv1D transposes: HF stores ``c_attn``, ``c_proj``, ``c_fc`` weights as (in, out); we keep
  (out, in) like ``nn.Linear``;
- ``lm_head.weight`` is tied to ``wte`` (one weight stored): it must equal ``wte`` when present;
- the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` are ignored.

Everything is checked before anything is returned: missing, unexpected or wrongly shaped
tensors raise one :class:`CheckpointError` that names them all.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from .config import GPT2Config

logger = logging.getLogger(__name__)

CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (or cannot be read)."""


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Our unquantized parameter names and shapes (the loader's target)."""
    d, inner = config.n_embd, config.n_inner
    shapes = {
        "transformer.wte.weight": (config.vocab_size, d),
        "transformer.wpe.weight": (config.n_positions, d),
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
    }
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        shapes.update({
            f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,),
            f"{p}.attn.c_attn.weight": (3 * d, d), f"{p}.attn.c_attn.bias": (3 * d,),
            f"{p}.attn.c_proj.weight": (d, d), f"{p}.attn.c_proj.bias": (d,),
            f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,),
            f"{p}.mlp.c_fc.weight": (inner, d), f"{p}.mlp.c_fc.bias": (inner,),
            f"{p}.mlp.c_proj.weight": (d, inner), f"{p}.mlp.c_proj.bias": (d,),
        })
    return shapes


def detect_source(model_dir: Path) -> tuple[str, list[Path]]:
    """Which weight files the directory holds: (source format, files)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return "huggingface-safetensor", files
    if (model_dir / "model.safetensors").is_file():
        return "huggingface-safetensor", [model_dir / "model.safetensors"]
    if (model_dir / "pytorch_model.bin").is_file():
        return "huggingface-torch", [model_dir / "pytorch_model.bin"]
    raise CheckpointError(
        f"no weights in {model_dir}: expected model.safetensors, model.safetensors.index.json "
        "with shards, or pytorch_model.bin"
    )


def _read_files(source: str, files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            if source == "huggingface-safetensor":
                from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

                try:
                    part = load_file(str(path))
                except (TypeError, ValueError):  # bf16 has no numpy dtype: go through torch
                    from safetensors.torch import load_file as load_torch  # pylint: disable=import-outside-toplevel

                    part = {k: v.float().numpy() for k, v in load_torch(str(path)).items()}
            else:
                try:
                    import torch  # pylint: disable=import-outside-toplevel
                except ImportError as err:
                    raise CheckpointError(
                        f"{path.name} is a PyTorch pickle and torch is not installed; "
                        "install torch or convert the checkpoint to safetensors"
                    ) from err
                state = torch.load(str(path), map_location="cpu", weights_only=True)
                part = {k: v.float().numpy() for k, v in state.items()}
        except CheckpointError:
            raise
        except Exception as err:  # corrupt or truncated files
            raise CheckpointError(f"cannot read {path}: {err}") from err
        tensors.update(part)
    return tensors


def load_hf_params(model_dir: str | Path, config: GPT2Config) -> dict[str, np.ndarray]:
    """fp32 parameters of ``model_dir`` under our names ((out, in) matrices), fully checked."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
    source, files = detect_source(model_dir)
    logger.info("loading %s weights from %s", source, ", ".join(f.name for f in files))
    raw = _read_files(source, files)

    expected = expected_shapes(config)
    out: dict[str, np.ndarray] = {}
    unexpected, bad_shape, bad_names = [], [], set()
    lm_head = None
    for hf_name, value in raw.items():
        name = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
        if IGNORED.search(name):
            continue
        if name == "lm_head.weight":
            lm_head = value
            continue
        ours = f"transformer.{name}"
        if ours not in expected:
            unexpected.append(hf_name)
            continue
        value = np.asarray(value, dtype=np.float32)
        if ours.endswith(CONV1D_SUFFIXES):
            value = value.T  # Conv1D (in, out) -> Linear (out, in)
        if tuple(value.shape) != expected[ours]:
            bad_shape.append(f"{hf_name}: {tuple(value.shape)} (expected {expected[ours]})")
            bad_names.add(ours)
            continue
        out[ours] = np.ascontiguousarray(value)
    missing = sorted(set(expected) - set(out) - bad_names)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if bad_shape:
        problems.append(f"wrongly shaped tensors: {'; '.join(bad_shape)}")
    if lm_head is not None and "transformer.wte.weight" in out:
        if lm_head.shape != out["transformer.wte.weight"].shape or not np.array_equal(
            np.asarray(lm_head, dtype=np.float32), out["transformer.wte.weight"]
        ):
            problems.append("lm_head.weight differs from transformer.wte.weight: only tied heads are supported")
    if problems:
        raise CheckpointError(f"checkpoint {model_dir} does not match the config: " + " | ".join(problems))
    return out


def random_params(exported, *, seed: int = 0) -> dict:
    """Random fp32 weights in GPT-2's init style for ``exported`` (an ``ExportedModel``), converted
    to the stored form of its scheme (seeded: the benchmarks' weights; speed does not depend on them)."""
    from .quantization import convert_params  # pylint: disable=import-outside-toplevel  # start-up time

    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_shapes(exported.config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            params[name] = np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, np.float32)
        else:
            params[name] = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
    return convert_params(params, exported.scheme)
