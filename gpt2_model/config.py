"""GPT-2 configuration with Hugging Face field names, and the presets we ship.

The field names follow ``transformers.GPT2Config`` so that a ``config.json`` written by
Hugging Face loads as it is; keys we do not use are kept in ``kwargs`` (nothing is dropped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Activations we implement. HF's "gelu_new" / "gelu_pytorch_tanh" are the tanh approximation.
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")

#: Largest prefill chunk we default to (the whole context window of every GPT-2 preset).
MAX_DEFAULT_PREFILL_CHUNK = 2048


class ConfigError(ValueError):
    """A configuration that cannot describe a GPT-2 model."""


@dataclasses.dataclass
class GPT2Config:  # pylint: disable=too-many-instance-attributes
    """Configuration of a GPT-2 model (Hugging Face names; derived fields after ``n_inner``)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Derived / deployment fields (MLC-LLM names). 0 means "derive it".
    context_window_size: int = 0
    prefill_chunk_size: int = 0
    head_dim: int = 0
    max_batch_size: int = 64
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"GPT2Config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"GPT2Config: unsupported activation_function {self.activation_function!r}; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.reorder_and_upcast_attn:
            logger.info("reorder_and_upcast_attn is ignored: attention always accumulates in fp32")
        if self.n_inner is None or self.n_inner == -1:
            self.n_inner = 4 * self.n_embd
        elif self.n_inner <= 0:
            raise ConfigError(f"GPT2Config.n_inner must be positive, got {self.n_inner}")
        if self.head_dim == 0:
            self.head_dim = self.n_embd // self.n_head
        elif self.head_dim * self.n_head != self.n_embd:
            raise ConfigError(
                f"GPT2Config: head_dim ({self.head_dim}) * n_head ({self.n_head}) != n_embd ({self.n_embd})"
            )
        if self.context_window_size == 0:
            self.context_window_size = self.n_positions
            logger.info("context_window_size not set: falling back to n_positions (%d)", self.n_positions)
        elif self.context_window_size > self.n_positions:
            raise ConfigError(
                f"GPT2Config: context_window_size ({self.context_window_size}) exceeds the "
                f"position table n_positions ({self.n_positions})"
            )
        if self.prefill_chunk_size == 0:
            self.prefill_chunk_size = min(self.context_window_size, MAX_DEFAULT_PREFILL_CHUNK)
            logger.info("prefill_chunk_size defaults to %d", self.prefill_chunk_size)
        elif self.prefill_chunk_size > self.context_window_size:
            logger.info(
                "prefill_chunk_size %d exceeds the context window; using %d",
                self.prefill_chunk_size,
                self.context_window_size,
            )
            self.prefill_chunk_size = self.context_window_size

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, source: dict[str, Any]) -> "GPT2Config":
        """Build from a Hugging Face style dict; unknown keys go to ``kwargs``."""
        source = dict(source)
        # HF aliases: n_ctx is the old name of n_positions.
        if "n_positions" not in source and "n_ctx" in source:
            source["n_positions"] = source["n_ctx"]
        field_names = {f.name for f in dataclasses.fields(cls)} - {"kwargs"}
        known = {k: v for k, v in source.items() if k in field_names}
        extra = dict(source.get("kwargs", {}))
        extra.update({k: v for k, v in source.items() if k not in field_names and k != "kwargs"})
        return cls(**known, kwargs=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> "GPT2Config":
        """Read a ``config.json`` (or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"{path}: model_type is {model_type!r}, expected 'gpt2'")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kwargs`` flattened back in, as HF writes them)."""
        out = dataclasses.asdict(self)
        extra = out.pop("kwargs")
        for key, value in extra.items():
            out.setdefault(key, value)
        return out

    def model_hash(self) -> str:
        """Hash of the fields that change the compiled kernels (not token ids or names)."""
        keys = (
            "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
            "activation_function", "layer_norm_epsilon", "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx", "context_window_size", "prefill_chunk_size",
        )
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _preset(**fields: Any) -> dict[str, Any]:
    base = {"vocab_size": 50257, "n_positions": 1024, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new", "bos_token_id": 50256, "eos_token_id": 50256}
    base.update(fields)
    return base


#: The Hugging Face checkpoints' configs (their config.json values), plus a tiny test model.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": _preset(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": _preset(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": _preset(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": _preset(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": _preset(n_embd=768, n_layer=6, n_head=12),
    # Not a real checkpoint: small enough for CPU tests and CI.
    "tiny": _preset(vocab_size=1000, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                    bos_token_id=0, eos_token_id=0),
    # tiny with GPT-2's head size (64): TVM's paged-KV decode kernel cannot launch for head_dim 16
    # on CUDA (blockDim.z 128 > 64), so GPU tests use this one
    "tiny-h64": _preset(vocab_size=1000, n_positions=256, n_embd=128, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0),
}


def get_config(name_or_dir: str | Path, **overrides: Any) -> GPT2Config:
    """A preset by name, or the ``config.json`` of a local Hugging Face directory."""
    key = str(name_or_dir)
    if key in PRESETS:
        data = dict(PRESETS[key])
        data.update(overrides)
        return GPT2Config.from_dict(data)
    path = Path(key)
    if path.exists():
        config = GPT2Config.from_file(path)
        return dataclasses.replace(config, **overrides) if overrides else config
    raise ConfigError(
        f"unknown model {key!r}: not a preset ({', '.join(PRESETS)}) and no such directory"
    )


def model_name(name_or_dir: str | Path) -> str:
    """A short name for databases and caches: the preset name or the directory's name."""
    key = str(name_or_dir)
    return key if key in PRESETS else Path(key).resolve().name
