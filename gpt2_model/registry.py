"""Model registry (MLC-LLM's ``MODELS``): a new architecture is one entry here."""

from __future__ import annotations

import dataclasses
from typing import Callable

from . import loader, quantization
from .config import GPT2Config
from .model import GPT2LMHeadModel


@dataclasses.dataclass(frozen=True)
class Model:
    """Everything the verbs need to know about one architecture."""

    name: str
    model: type
    config: type
    source: dict[str, Callable]  # source format -> loader(model_dir, config) -> fp32 params
    quantize: dict[str, Callable]  # quantization name -> convert(params) -> stored params


MODELS: dict[str, Model] = {
    "gpt2": Model(
        name="gpt2",
        model=GPT2LMHeadModel,
        config=GPT2Config,
        source={
            "huggingface-safetensor": loader.load_hf_params,
            "huggingface-torch": loader.load_hf_params,
        },
        quantize={
            name: (lambda params, _s=scheme: quantization.convert_params(params, _s))
            for name, scheme in quantization.QUANTIZATIONS.items()
        },
    ),
}


def get_model(model_type: str) -> Model:
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(f"unknown model type {model_type!r}; registered: {', '.join(MODELS)}") from None
