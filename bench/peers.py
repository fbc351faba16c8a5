"""PyTorch peers: Hugging Face ``GPT2LMHeadModel`` (eager and ``torch.compile``) and cuBLAS GEMMs.

The peer model gets the same config and the same weights as the TVM engine: both start from one
seeded fp32 parameter dict in our naming (:func:`random_params`), which
:func:`hf_state_dict` maps to HF's layout (Conv1D weights transposed back to (in, out), the
tied ``lm_head``). It runs in the activation dtype of the quantization (``q0f16``/``q4f16_1`` ->
float16, ``q0f32`` -> float32); a quantized TVM model is compared against the unquantized
PyTorch peer, which the result notes say.

Variants
--------
``torch-eager``
    ``GPT2LMHeadModel`` with HF's default attention (SDPA), KV cache (``DynamicCache``): one
    forward per decode step, ``logits_to_keep=1`` for prefill.
``hf-compile``
    The same model with a ``StaticCache`` (static shapes) and ``torch.compile`` (mode
    ``reduce-overhead``, i.e. CUDA graphs, on CUDA; default mode on CPU) for decode steps.
    Compilation happens in warm-up; if it fails the row reports the error's first line.
    (The ``torch-compile`` variant is the gpt-fast-style peer of ``bench/gptfast.py``.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "torch_available",
    "random_params",
    "hf_config",
    "hf_state_dict",
    "build_hf_model",
    "TorchDecodeRunner",
    "TorchPrefillRunner",
    "torch_weight_bytes",
    "cublas_matmul_us",
    "compile_mode",
    "sdpa_us",
]

from gpt2_model.loader import CONV1D_SUFFIXES as _CONV1D_SUFFIXES  # noqa: E402  (one definition of the Conv1D weights)
from tuning.graph_timer import cuda_graph_us  # noqa: E402


def torch_available() -> bool:
    """True when torch and transformers import."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Our unquantized parameter names and shapes (from the loader: one source of truth)."""
    from gpt2_model.loader import expected_shapes

    return expected_shapes(config)


def random_params(config, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded GPT-2-style random fp32 weights under our names ((out, in) matrices).

    Linear and embedding weights ~ N(0, 0.02) (HF's ``initializer_range``), residual output
    projections scaled by 1/sqrt(2 n_layer) as in GPT-2, biases 0, LayerNorm gamma 1 / beta 0.
    Values do not affect throughput; they only need to be the same for every variant and keep
    activations finite in fp16.

    Parameters
    ----------
    config : gpt2_model.config.GPT2Config
    seed : int

    Returns
    -------
    dict of str to numpy.ndarray
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    resid = 0.02 / np.sqrt(2.0 * config.n_layer)
    for name, shape in _param_shapes(config).items():
        if name.endswith(".bias"):
            out[name] = np.zeros(shape, np.float32)
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            out[name] = np.ones(shape, np.float32)
        else:
            std = resid if name.endswith("c_proj.weight") else 0.02
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    return out


def hf_config(config):
    """``transformers.GPT2Config`` with the fields of our config (dropout off)."""
    from transformers import GPT2Config as HFConfig

    bos = config.bos_token_id if config.bos_token_id < config.vocab_size else None
    eos = config.eos_token_id if config.eos_token_id < config.vocab_size else None
    return HFConfig(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function=config.activation_function,
        layer_norm_epsilon=config.layer_norm_epsilon,
        scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )


def hf_state_dict(params: dict[str, np.ndarray]):
    """Our-named fp32 params -> HF ``GPT2LMHeadModel`` state dict (torch tensors).

    Conv1D weights go back to (in, out); ``lm_head.weight`` is tied to ``wte`` by HF itself.
    """
    import torch

    sd = {}
    for name, value in params.items():
        if name.endswith(_CONV1D_SUFFIXES):
            value = value.T
        sd[name] = torch.from_numpy(np.ascontiguousarray(value))
    return sd


def _torch_dtype(dtype: str):
    import torch

    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def build_hf_model(config, *, params: dict[str, np.ndarray], dtype: str, device: str):
    """An eval-mode ``GPT2LMHeadModel`` holding ``params``.

    Parameters
    ----------
    config : GPT2Config
    params : dict
        Our-named fp32 weights (:func:`random_params` or a checkpoint loaded by the loader).
    dtype : str
        ``float16``/``float32``.
    device : str
        ``cpu`` or ``cuda:N``.

    Returns
    -------
    transformers.GPT2LMHeadModel
    """
    import torch
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_config(config))
    sd = hf_state_dict(params)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    # lm_head is tied to wte; attention mask buffers are recomputed by HF
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(device=device, dtype=_torch_dtype(dtype)).eval()
    return model


def torch_weight_bytes(model) -> int:
    """Bytes of weights one forward reads: every parameter once (``lm_head`` is tied to
    ``wte`` and counted once), except ``wpe`` of which only a few rows are read."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith("wpe.weight"):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def compile_mode(*, device: str, cuda_graph: bool) -> str | None:
    """torch.compile mode: ``reduce-overhead`` (CUDA graphs) on CUDA with ``cuda_graph``,
    else the default mode (``None``)."""
    return "reduce-overhead" if device.startswith("cuda") and cuda_graph else None


def _cache_kwarg(model) -> str:
    """``cache`` in transformers >= 5.x, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class _Common:
    model: Any
    device: str
    seed: int = 0

    def _sync(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def _set_forward(self, *, compiled: bool, cuda_graph: bool) -> None:
        """The forward to call: the model itself (eager) or its torch.compile (static shapes)."""
        self.compiled = compiled
        self.variant = "hf-compile" if compiled else "torch-eager"
        self._kw = _cache_kwarg(self.model)
        self._fwd = self.model
        self.compile_mode = compile_mode(device=self.device, cuda_graph=cuda_graph) if compiled else None
        if compiled:
            import torch

            self._fwd = torch.compile(self.model, mode=self.compile_mode, dynamic=False)

    def _tokens(self, batch: int, length: int):
        import torch

        g = torch.Generator().manual_seed(self.seed)
        vocab = self.model.config.vocab_size
        return torch.randint(0, vocab, (batch, length), generator=g).to(self.device)


class TorchDecodeRunner(_Common):
    """Decode steps of the HF model with a KV cache, for :func:`bench.decode.run_decode`.

    ``start(batch=, prompt_len=, gen_len=)`` prefills the prompt (untimed) and prepares the
    cache; ``step()`` runs one decode step for the whole batch (logits of every sequence);
    ``stop()`` drops the cache.
    """

    def __init__(self, model, *, device: str, compiled: bool, seed: int = 0, cuda_graph: bool = True):
        super().__init__(model=model, device=device, seed=seed)
        self._set_forward(compiled=compiled, cuda_graph=cuda_graph)
        self._cache = None
        self._pos = 0
        self._next = None
        self.weight_bytes = torch_weight_bytes(model)
        cfg = model.config
        self.kv_bytes_per_token = 2 * cfg.n_layer * cfg.n_embd * next(model.parameters()).element_size()

    def start(self, *, batch: int, prompt_len: int, gen_len: int) -> None:
        import torch
        from transformers import DynamicCache, StaticCache

        ids = self._tokens(batch, prompt_len)
        with torch.inference_mode():
            if self.compiled:
                self._cache = StaticCache(config=self.model.config, max_cache_len=prompt_len + gen_len)
                pos = torch.arange(prompt_len, device=self.device).expand(batch, prompt_len)
                self.model(ids, use_cache=True, logits_to_keep=1, position_ids=pos, **{self._kw: self._cache})
            else:
                self._cache = DynamicCache(config=self.model.config)
                self.model(ids, use_cache=True, logits_to_keep=1, **{self._kw: self._cache})
        self._pos = prompt_len
        self._next = ids[:, -1:].clone()
        self._batch = batch
        self._sync()

    def step(self) -> None:
        import torch

        with torch.inference_mode():
            if self.compiled:
                pos = torch.full((self._batch, 1), self._pos, dtype=torch.long, device=self.device)
                out = self._fwd(self._next, use_cache=True, position_ids=pos, **{self._kw: self._cache})
            else:
                out = self._fwd(self._next, use_cache=True, **{self._kw: self._cache})
        self._pos += 1
        return out.logits

    def stop(self) -> None:
        self._cache = None
        self._next = None


class TorchPrefillRunner(_Common):
    """Prefill of ``batch`` sequences of ``seq_len`` tokens from an empty cache (HF model).

    ``prepare(batch=, seq_len=)`` makes the inputs (untimed), ``run()`` is the timed prefill
    (last-token logits, like the TVM engine) into a fresh ``DynamicCache``, ``cleanup()`` drops
    it. ``torch-compile`` compiles the prefill forward with static shapes (one graph per tested
    shape) and runs it without a cache object (``use_cache=False``: K/V are computed but not
    stored, which keeps Python cache objects out of the compiled graph).
    """

    def __init__(self, model, *, device: str, compiled: bool, seed: int = 0, cuda_graph: bool = True):
        super().__init__(model=model, device=device, seed=seed)
        self._set_forward(compiled=compiled, cuda_graph=cuda_graph)
        self._ids = None

    def prepare(self, *, batch: int, seq_len: int) -> None:
        self._ids = self._tokens(batch, seq_len)
        self._sync()

    def run(self) -> None:
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            if self.compiled:  # no Python cache object inside the compiled graph (static, graph-safe)
                out = self._fwd(self._ids, use_cache=False, logits_to_keep=1)
            else:
                cache = DynamicCache(config=self.model.config)
                out = self._fwd(self._ids, use_cache=True, logits_to_keep=1, **{self._kw: cache})
        return out.logits

    def cleanup(self) -> None:
        self._ids = None


def _cuda_torch(device: str):
    """torch, when it is installed and ``device`` is a CUDA device it sees; else None (a CPU
    "cuBLAS" or "SDPA" figure would be meaningless)."""
    try:
        import torch
    except ImportError:
        return None
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch


def cublas_matmul_us(*, m: int, n: int, k: int, dtype: str, device: str, repeats: int = 20,
                     warmup: int = 5, transpose_b: bool = True) -> list[float] | None:
    """Time ``(m, k) @ (n, k)^T`` with torch (cuBLAS on CUDA), in microseconds per call.

    Returns ``None`` when torch is unavailable or ``device`` is not a CUDA device torch sees
    (a CPU "cuBLAS" figure would be meaningless). Timed as the issue asks, CUDA-graph style: ``iters``
    back-to-back calls are captured in one CUDA graph and each replay is timed with events, so
    the figure is device time per call without Python/launch gaps (as TVM's time_evaluator gives).
    """
    torch = _cuda_torch(device)
    if torch is None:
        return None
    dt = _torch_dtype(dtype)
    a = torch.randn(m, k, device=device, dtype=dt)
    b = torch.randn(n, k, device=device, dtype=dt) if transpose_b else torch.randn(k, n, device=device, dtype=dt)

    def f():
        return a @ (b.t() if transpose_b else b)

    return cuda_graph_us(f, device=device, repeats=repeats, warmup=warmup)


def sdpa_us(*, batch: int, heads: int, seq_len: int, head_dim: int, dtype: str, device: str,
            repeats: int = 20) -> list[float] | None:
    """Time causal ``torch.nn.functional.scaled_dot_product_attention`` on (batch, heads, L, d)
    with the flash backend, CUDA-graph timed like :func:`cublas_matmul_us` (µs per call).

    Returns ``None`` without torch or off CUDA.
    """
    torch = _cuda_torch(device)
    if torch is None:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dt = _torch_dtype(dtype)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dt) for _ in range(3))

    def f():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return cuda_graph_us(f, device=device, repeats=repeats)


