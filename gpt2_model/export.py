"""Export the nn.Module to a relax IRModule (the start of the data path)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tvm import IRModule
from tvm.relax.frontend import nn
from tvm.target import Target

from .config import GPT2Config
from .model import GPT2LMHeadModel
from .quantization import QuantScheme, get_scheme


@dataclasses.dataclass
class ExportedModel:
    """A relax module with its parameter list and the metadata the runtime needs."""

    mod: IRModule
    named_params: list[tuple[str, nn.Parameter]]
    config: GPT2Config
    scheme: QuantScheme
    metadata: dict[str, Any]

    @property
    def param_names(self) -> list[str]:
        return [name for name, _, _ in param_specs(self.metadata)]

    def param_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of every exported parameter, in calling order."""
        return param_specs(self.metadata)


def param_specs(metadata: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every parameter an export's ``metadata`` records, in calling order."""
    return [(p["name"], tuple(int(d) for d in p["shape"]), str(p["dtype"])) for p in metadata["params"]]


def export_model(config: GPT2Config, *, quantization: str, target: Target, debug: bool = False,
                 buckets: dict[str, list[int]] | None = None, model_cls: type = GPT2LMHeadModel,
                 norm_gemv=None, gemm=None) -> ExportedModel:
    """Build the model for ``quantization`` and export ``get_default_spec()`` to relax.

    ``target`` is needed at export time because the paged KV cache embeds its attention kernels
    (CPU and GPU variants differ). ``debug=True`` makes ``op.print_`` calls in the model print at
    run time (the functions then thread IO effects; :class:`~gpt2_model.runtime.Engine` handles
    that). ``model_cls`` lets a subclass (one with prints, say) be exported the same way.
    ``buckets`` adds static-shape entry points (``batch_decode_b8``, ``prefill_s1024``; see
    ``GPT2LMHeadModel.get_default_spec``). ``norm_gemv`` (a :class:`~gpt2_model.norm_gemv_plan.NormGemvPlan`,
    CUDA targets) fuses each decode layer norm into the GEMV after it for the static shapes it names;
    ``gemm`` (a :class:`~gpt2_model.wgmma_plan.GemmPlan`) runs the prefill GEMMs of the chunk shapes it
    names on the Hopper wgmma kernel.
    """
    scheme = get_scheme(quantization)
    model = model_cls(config, scheme, target, norm_gemv=norm_gemv, gemm=gemm)
    mod, named_params = model.export_tvm(spec=model.get_default_spec(buckets, debug=debug), debug=debug)
    metadata = {
        "model_type": "gpt2",
        "quantization": scheme.name,
        "debug": bool(debug),
        "activation_dtype": scheme.activation_dtype,
        "context_window_size": config.context_window_size,
        "prefill_chunk_size": config.prefill_chunk_size,
        "max_batch_size": config.max_batch_size,
        "buckets": {k: list(v) for k, v in (buckets or {}).items()},
        "norm_gemv": sorted(norm_gemv.configs) if norm_gemv is not None and model.norm_gemv is not None else [],
        "wgmma_gemm": sorted(gemm.configs) if gemm is not None and model.gemm is not None else [],
        "vocab_size": config.vocab_size,
        "n_embd": config.n_embd,
        "params": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in
                   [(n, tuple(int(x) for x in p.shape), str(p.dtype)) for n, p in named_params]],
    }
    return ExportedModel(mod=mod, named_params=named_params, config=config, scheme=scheme, metadata=metadata)


@dataclasses.dataclass
class ExportedInfo:
    """What a runtime needs of an export without its relax module: the config, the weight scheme
    and the metadata (buckets, parameter specs, templates) recorded when the library was built.
    :class:`~gpt2_model.runtime.Engine` takes it in place of an :class:`ExportedModel`, so a
    cached library opens without exporting the model again (bench's library cache)."""

    config: GPT2Config
    scheme: QuantScheme
    metadata: dict[str, Any]

    @property
    def param_names(self) -> list[str]:
        return [name for name, _, _ in param_specs(self.metadata)]

    def param_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of every exported parameter, in calling order."""
        return param_specs(self.metadata)


def exported_info(config: GPT2Config, metadata: dict[str, Any]) -> ExportedInfo:
    """An :class:`ExportedInfo` from a library's recorded ``metadata`` (``ExportedModel.metadata``).

    Raises
    ------
    ValueError
        The metadata is not a GPT-2 export's, or lacks its parameter list or quantization.
    """
    if not isinstance(metadata, dict) or metadata.get("model_type") != "gpt2" or "params" not in metadata \
            or "quantization" not in metadata:
        raise ValueError("not the metadata of a GPT-2 export (model_type, quantization, params)")
    if metadata.get("vocab_size") != config.vocab_size or metadata.get("n_embd") != config.n_embd:
        raise ValueError(f"export metadata for vocab {metadata.get('vocab_size')} / n_embd {metadata.get('n_embd')} "
                         f"does not match the config ({config.vocab_size} / {config.n_embd})")
    return ExportedInfo(config=config, scheme=get_scheme(metadata["quantization"]), metadata=dict(metadata))
