"""The gpt-fast-style PyTorch peer: a compact GPT-2 of our own, a static KV cache, torch.compile.

What a user would write instead of this suite (pytorch-labs/gpt-fast, for GPT-2): the model in
~100 lines of PyTorch on the SAME weights as the TVM engine (the fp32 parameter dict bench builds,
our names: HF's, with Linear weights as ``(out, in)`` matrices), a static KV cache of
``(b, h, max_len, d)`` per layer sized to prompt + generated tokens (written in place with
``index_copy_`` at ``input_pos``, a device tensor), the causal mask indexed by ``input_pos``, a
decode step (gpt-fast's ``decode_one_token``) that computes the logits of the last position only
and the greedy argmax on the device, compiled with ``mode="reduce-overhead", fullgraph=True``
(CUDA graphs; no graphs on the CPU), and a compiled prefill (fullgraph, static shapes, no CUDA
graphs, as gpt-fast's ``--compile_prefill``), everything under ``no_grad``.

``GptFastDecodeRunner`` / ``GptFastPrefillRunner`` have the interface of the runners in
:mod:`bench.peers` (``start/step/stop`` and ``prepare/run/cleanup``); both have
``logits(token_ids)`` (last-position logits of a fresh prefill) for the HF logits check.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["GptFast", "GptFastDecodeRunner", "GptFastPrefillRunner", "SDPA_CHOICES", "decode_one_token",
           "prefill"]


def _torch_dtype(dtype: str):
    import torch

    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


@functools.lru_cache(maxsize=None)
def _gpt_fast_module():
    """The nn.Module class, built once on first use (torch is imported lazily: bench --help stays
    fast). Once, not per model: dynamo guards on the module's type, so a class per model made every
    new runner recompile the same shapes (2026-12-02, CPU: ``___check_type_id(self, ...)``)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GptFastGPT2(nn.Module):
        """GPT-2 with fused c_attn, SDPA attention over a static KV cache, tied lm_head."""

        def __init__(self, config, params: dict[str, np.ndarray], *, dtype, device):
            super().__init__()
            c = config
            self.n_layer, self.n_head, self.head_dim, self.n_embd = c.n_layer, c.n_head, c.head_dim, c.n_embd
            self.eps = c.layer_norm_epsilon
            self.act = c.activation_function
            scale = self.head_dim**-0.5 if c.scale_attn_weights else 1.0
            self.scales = [scale / (i + 1) if c.scale_attn_by_inverse_layer_idx else scale for i in range(c.n_layer)]

            def p(name):  # our names, (out, in) Linear weights: F.linear takes them as they are
                return nn.Parameter(torch.from_numpy(np.ascontiguousarray(params[name])).to(device=device, dtype=dtype),
                                    requires_grad=False)

            self.wte, self.wpe = p("transformer.wte.weight"), p("transformer.wpe.weight")  # lm_head = wte
            names = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                     "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias")
            self.layers = nn.ModuleList()
            for i in range(c.n_layer):
                layer = nn.Module()
                for n in names:
                    setattr(layer, n.replace(".", "_"), p(f"transformer.h.{i}.{n}"))
                # One (b, h, max_len, d) K and V buffer per layer, as gpt-fast's KVCache: the step
                # writes into the buffer itself. (A stacked (n_layer, ...) cache written through
                # ``cache[i].index_copy_`` is a mutation of a view: functionalization turned it into
                # a copy of the layer's whole cache per layer plus a copy back at the end of the
                # graph, traffic that grows with batch x max_len; seen in inductor's output code.)
                layer.register_buffer("k_cache", None, persistent=False)
                layer.register_buffer("v_cache", None, persistent=False)
                self.layers.append(layer)
            self.ln_f_w, self.ln_f_b = p("transformer.ln_f.weight"), p("transformer.ln_f.bias")
            self.register_buffer("causal", None, persistent=False)

        def setup_cache(self, batch: int, max_len: int) -> None:
            """Static KV cache (b, h, max_len, d) per layer and the causal mask over it.

            Buffers (static inputs of the CUDA graph), reused in place when the shape repeats so
            a new run replays the recorded graph instead of recording another; zeroed, because a
            masked-out position still enters SDPA's product (garbage NaN * 0 is NaN).
            """
            w = self.wte
            shape = (batch, self.n_head, max_len, self.head_dim)
            first = self.layers[0]
            if first.k_cache is not None and tuple(first.k_cache.shape) == shape:
                for layer in self.layers:
                    layer.k_cache.zero_()
                    layer.v_cache.zero_()
                return
            for layer in self.layers:
                layer.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
                layer.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
            self.causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=w.device))

        def _gelu(self, x):
            if self.act in ("gelu_new", "gelu_pytorch_tanh"):
                return F.gelu(x, approximate="tanh")
            return F.gelu(x) if self.act == "gelu" else F.relu(x)

        def forward(self, ids, input_pos):
            """ids (b, s) int64, input_pos (s,) int64 -> logits of the last position (b, vocab)."""
            b, s = ids.shape
            h, d = self.n_head, self.head_dim
            x = F.embedding(ids, self.wte) + F.embedding(input_pos, self.wpe)  # (b, s, n_embd)
            mask = self.causal[None, None, input_pos]  # (1, 1, s, max_len): key position <= query position
            for i, L in enumerate(self.layers):
                qkv = F.linear(F.layer_norm(x, (self.n_embd,), L.ln_1_weight, L.ln_1_bias, self.eps),
                               L.attn_c_attn_weight, L.attn_c_attn_bias)  # (b, s, 3 * h * d)
                q, k, v = qkv.view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)  # each (b, h, s, d)
                L.k_cache.index_copy_(2, input_pos, k)  # gpt-fast: k_cache[:, :, input_pos] = k
                L.v_cache.index_copy_(2, input_pos, v)
                y = F.scaled_dot_product_attention(q, L.k_cache, L.v_cache, attn_mask=mask,
                                                   scale=self.scales[i])  # (b, h, s, d)
                x = x + F.linear(y.transpose(1, 2).reshape(b, s, h * d), L.attn_c_proj_weight, L.attn_c_proj_bias)
                m = F.layer_norm(x, (self.n_embd,), L.ln_2_weight, L.ln_2_bias, self.eps)
                m = self._gelu(F.linear(m, L.mlp_c_fc_weight, L.mlp_c_fc_bias))  # (b, s, n_inner)
                x = x + F.linear(m, L.mlp_c_proj_weight, L.mlp_c_proj_bias)
            last = F.layer_norm(x[:, -1], (self.n_embd,), self.ln_f_w, self.ln_f_b, self.eps)  # (b, n_embd)
            return F.linear(last, self.wte).float()  # (b, vocab), fp32 like the engine's

    return GptFastGPT2


def GptFast(config, params: dict[str, np.ndarray], *, dtype: str, device: str):  # noqa: N802 - a class factory
    """The compact GPT-2 module (eval, no grad) holding ``params`` in ``dtype`` on ``device``."""
    return _gpt_fast_module()(config, params, dtype=_torch_dtype(dtype), device=device).eval()


#: SDPA backend choices of a phase (``decode_sdpa`` / ``prefill_sdpa``): ``default`` = torch's
#: own selection (what a gpt-fast user gets without a context manager), ``math`` = the math backend
#: only (gpt-fast's ``decode_n_tokens`` context: inductor then generates the attention itself),
#: ``no-cudnn`` = flash / memory-efficient / math (cuDNN's kernel left out).
SDPA_CHOICES = ("default", "math", "no-cudnn")


def _sdpa_context(choice: str):
    """The ``sdpa_kernel`` context of an SDPA choice (a null context for ``default``). Entered
    INSIDE the compiled function: dynamo traces it into the graph; torch does not guard on the
    backend flags, so a context around a compiled call is only seen at trace time."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel

    if choice == "default":
        return contextlib.nullcontext()
    if choice == "math":
        return sdpa_kernel(SDPBackend.MATH)
    if choice == "no-cudnn":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    raise ValueError(f"SDPA choice {choice!r} not in {SDPA_CHOICES}")


def decode_one_token(model, ids, input_pos, sdpa: str):
    """gpt-fast's ``decode_one_token`` (greedy): next ids (b, 1) of one step. ``sdpa`` is a
    string constant (dynamo guards on its value: one graph per choice)."""
    with _sdpa_context(sdpa):
        logits = model(ids, input_pos)
    return logits.argmax(dim=-1, keepdim=True)


def prefill(model, ids, input_pos, sdpa: str):
    """gpt-fast's ``prefill``, returning the last-position logits (b, vocab)."""
    with _sdpa_context(sdpa):
        return model(ids, input_pos)


def _raise_recompile_limit(torch, limit: int = 64) -> None:
    """Dynamo keeps at most ``recompile_limit`` (8) graphs per code object, then runs the function
    EAGER, silently. Static shapes compile one graph per (batch, cache length) and the code objects
    are shared by every runner of the process: a bench over many shapes could pass 8 and time eager
    code as "torch-compile". Raised, process-wide (a bench process), never lowered."""
    cfg = torch._dynamo.config  # pylint: disable=protected-access
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(int(getattr(cfg, name)), limit))


class _Runner:
    """Shared setup: model, compiled step functions, the logits check, byte counts for the roofline.

    Options (defaults = the bench peer; ``scripts/peer_diag.py`` times the others):
    ``decode_sdpa`` / ``prefill_sdpa`` (:data:`SDPA_CHOICES`), ``coordinate_descent`` (inductor's
    coordinate-descent tuning of Triton kernels, which gpt-fast's generate.py switches on),
    ``prefill_graphs`` (CUDA graphs for the prefill too: gpt-fast has none there; a diagnosis of
    launch overhead).
    """

    def __init__(self, config, params_fp32: dict[str, np.ndarray], *, dtype: str, device: str, compiled: bool,
                 seed: int = 0, decode_sdpa: str = "default", prefill_sdpa: str = "default",
                 coordinate_descent: bool = True, prefill_graphs: bool = False):
        import torch

        for choice in (decode_sdpa, prefill_sdpa):
            if choice not in SDPA_CHOICES:
                raise ValueError(f"SDPA choice {choice!r} not in {SDPA_CHOICES}")
        self.config, self.device, self.compiled, self.seed = config, device, bool(compiled), seed
        self.variant = "torch-compile" if compiled else "torch-eager"
        self.decode_sdpa, self.prefill_sdpa = decode_sdpa, prefill_sdpa
        self.coordinate_descent, self.prefill_graphs = bool(coordinate_descent), bool(prefill_graphs)
        self.model = GptFast(config, params_fp32, dtype=dtype, device=device)
        self.cuda = str(device).startswith("cuda")
        self.compile_mode = ("reduce-overhead" if self.cuda else "default") if compiled else None
        size = np.dtype(dtype).itemsize
        self.weight_bytes = int(sum(v.size * size for k, v in params_fp32.items() if not k.endswith("wpe.weight")))
        self.kv_bytes_per_token = 2 * config.n_layer * config.n_embd * size
        self._torch = torch
        if compiled:
            _raise_recompile_limit(torch)

    def _compile(self, fn, *, graphs: bool):
        """torch.compile ``fn`` (fullgraph, static shapes); CUDA graphs only when ``graphs`` on CUDA.

        ``options`` instead of ``mode``: torch.compile takes one or the other, and mode
        "reduce-overhead" is exactly ``{"triton.cudagraphs": True}`` (torch._inductor.list_mode_options);
        coordinate-descent tuning is the other inductor setting gpt-fast's generate.py makes (there
        process-wide, here per compile)."""
        if not self.compiled:
            return fn
        options = {"triton.cudagraphs": bool(graphs and self.cuda)}
        if self.coordinate_descent:
            options["coordinate_descent_tuning"] = True
        return self._torch.compile(fn, fullgraph=True, dynamic=False, options=options)

    def _sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize(self.device)

    def _tokens(self, batch: int, length: int):
        g = self._torch.Generator().manual_seed(self.seed)
        return self._torch.randint(0, self.config.vocab_size, (batch, length), generator=g).to(self.device)

    def _positions(self, length: int):
        return self._torch.arange(length, device=self.device)

    def _prefill(self, ids, fn=None, pos=None):
        """Prefill of ``ids`` into the cache the caller set up: last-position logits (b, vocab).

        Under ``no_grad`` as gpt-fast's ``generate``, as every call here: the tensors fed to a
        compiled function must not alternate between inference and normal tensors (dynamo guards
        on the dispatch keys: the old inference_mode prefill + plain argmax made each batch size
        compile the decode step twice, 2026-12-01 peer_diag.txt)."""
        pos = self._positions(ids.shape[1]) if pos is None else pos
        with self._torch.no_grad():
            if fn is None:
                with _sdpa_context(self.prefill_sdpa):
                    return self.model(ids, pos)
            return fn(self.model, ids, pos, self.prefill_sdpa)

    def logits(self, token_ids: np.ndarray) -> np.ndarray:
        """Last-position logits (b, vocab) fp32 of a fresh prefill of ``token_ids`` (b, s) (eager)."""
        ids = self._torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"token_ids must be (batch, seq_len >= 1), got shape {tuple(ids.shape)}")
        self.model.setup_cache(ids.shape[0], ids.shape[1])
        return self._prefill(ids).float().cpu().numpy()


class GptFastDecodeRunner(_Runner):
    """Greedy decode steps of the whole batch: ``start`` prefills a random prompt (untimed) into a
    cache of prompt_len + gen_len positions; each ``step`` runs the compiled one-token forward and
    the argmax on the device and feeds the next step from it (no host copy, no sync).

    The step's attention (``decode_sdpa``) defaults to torch's own SDPA backend choice with the
    boolean mask, not gpt-fast's math-backend context: on an H200 (torch 2.11, 2026-12-01/02,
    before the KV-cache layout fix) the math backend made the step slower at every batch
    (b8 0.94 -> 1.14 ms, b32 2.36 -> 3.22 ms): the math decomposition reads the whole static cache
    through two batched matmuls (and, in fp16, upcasts it to fp32 first, torch's default
    ``allow_fp16_bf16_reduction_math_sdp(False)``), while the fused kernels read it once.
    gpt-fast's comment on the context is about its batch-1 Llama decode; ``peer_diag.py`` times
    both so the choice can be re-checked on each torch."""

    def __init__(self, config, params_fp32, *, dtype: str, device: str, compiled: bool, seed: int = 0,
                 compile_prefill: bool = True, **options):
        super().__init__(config, params_fp32, dtype=dtype, device=device, compiled=compiled, seed=seed, **options)
        self._step_fn = self._compile(decode_one_token, graphs=True)
        # start()'s prefill is untimed here: compile_prefill=False saves a compile per shape.
        self._prefill_fn = self._compile(prefill, graphs=self.prefill_graphs) if compile_prefill else None
        self._next = self._pos = None
        self._max_len = self._host_pos = 0

    def start(self, *, batch: int, prompt_len: int, gen_len: int) -> None:
        """Prefill ``batch`` random prompts of ``prompt_len`` tokens; room for ``gen_len`` steps."""
        self._start(self._tokens(batch, prompt_len), gen_len)

    def _start(self, ids, gen_len: int) -> None:
        torch = self._torch
        self._max_len = ids.shape[1] + gen_len
        if self._max_len > self.config.n_positions:
            raise ValueError(f"{ids.shape[1]} prompt + {gen_len} new tokens exceed n_positions {self.config.n_positions}")
        self.model.setup_cache(ids.shape[0], self._max_len)
        logits = self._prefill(ids, self._prefill_fn)
        with torch.no_grad():
            # a tensor of its own (not the graph's output memory), made once per run
            self._next = logits.argmax(dim=-1, keepdim=True)  # (b, 1)
            self._pos = torch.tensor([ids.shape[1]], device=self.device)  # input_pos: a tensor, moved on the device
        self._host_pos = ids.shape[1]
        self._sync()

    def step(self):
        """One decode step of the batch: the next ids (b, 1) on the device."""
        if self._next is None:
            raise RuntimeError("start() first")
        if self._host_pos >= self._max_len:
            raise RuntimeError(f"the static cache holds {self._max_len} positions: start() again")
        with self._torch.no_grad():
            if self.compiled and self.cuda:
                self._torch.compiler.cudagraph_mark_step_begin()
            # The output lives in the CUDA graph's static memory, overwritten by the next replay:
            # keep a copy (gpt-fast clones it too). The position moves on the device.
            self._next = self._step_fn(self.model, self._next, self._pos, self.decode_sdpa).clone()
            self._pos += 1
        self._host_pos += 1
        return self._next

    def stop(self) -> None:
        self._next = None

    def generate(self, token_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy tokens (b, max_new_tokens) after the prompts ``token_ids`` (b, s)."""
        ids = self._torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=self.device)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self._start(ids, max_new_tokens - 1)
        out = [self._next]
        for _ in range(max_new_tokens - 1):
            out.append(self.step())
        tokens = self._torch.cat(out, dim=1).cpu().numpy()
        self.stop()
        return tokens


class GptFastPrefillRunner(_Runner):
    """Prefill of ``batch`` fresh sequences of ``seq_len`` tokens (last-position logits), compiled
    with static shapes; the cache is sized to the prompt. The timed ``run`` is the compiled call
    alone: tokens, positions and the zeroed cache are made in ``prepare``."""

    def __init__(self, config, params_fp32, *, dtype: str, device: str, compiled: bool, seed: int = 0, **options):
        super().__init__(config, params_fp32, dtype=dtype, device=device, compiled=compiled, seed=seed, **options)
        self._fn = self._compile(prefill, graphs=self.prefill_graphs)
        self._ids = self._pos = None

    def prepare(self, *, batch: int, seq_len: int) -> None:
        self._ids = self._tokens(batch, seq_len)
        self._pos = self._positions(seq_len)
        self.model.setup_cache(batch, seq_len)
        self._sync()

    def run(self) -> Any:
        if self.compiled and self.cuda and self.prefill_graphs:
            self._torch.compiler.cudagraph_mark_step_begin()
        return self._prefill(self._ids, self._fn, self._pos)

    def cleanup(self) -> None:
        self._ids = self._pos = None
