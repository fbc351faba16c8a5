"""The gpt-fast-style PyTorch peer: a compact GPT-2 of our own, a static KV cache, torch.compile.

What a user would write instead of this suite (pytorch-labs/gpt-fast, for GPT-2): the model in
~100 lines of PyTorch on the SAME weights as the TVM engine (the fp32 parameter dict bench builds,
our names: HF's, with Linear weights as ``(out, in)`` matrices), a KV cache of static shape
``(n_layer, b, h, max_len, d)`` sized to prompt + generated tokens, a decode step that computes
the logits of the last position only and the greedy argmax on the device, compiled with
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs; the default mode on
CPU), and a compiled prefill (static shapes, no CUDA graphs, as gpt-fast's).

``GptFastDecodeRunner`` / ``GptFastPrefillRunner`` have the interface of the runners in
:mod:`bench.peers` (``start/step/stop`` and ``prepare/run/cleanup``); both have
``logits(token_ids)`` (last-position logits of a fresh prefill) for the HF logits check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GptFast", "GptFastDecodeRunner", "GptFastPrefillRunner"]


def _torch_dtype(dtype: str):
    import torch

    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _gpt_fast_module():
    """The nn.Module class, built on first use (torch is imported lazily: bench --help stays fast)."""
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
                self.layers.append(layer)
            self.ln_f_w, self.ln_f_b = p("transformer.ln_f.weight"), p("transformer.ln_f.bias")
            for name in ("k_cache", "v_cache", "causal"):
                self.register_buffer(name, None, persistent=False)

        def setup_cache(self, batch: int, max_len: int) -> None:
            """Static KV cache (n_layer, b, h, max_len, d) and the causal mask over it.

            Buffers (static inputs of the CUDA graph), reused in place when the shape repeats so
            a new run replays the recorded graph instead of recording another; zeroed, because a
            masked-out position still enters SDPA's product (garbage NaN * 0 is NaN).
            """
            w = self.wte
            shape = (self.n_layer, batch, self.n_head, max_len, self.head_dim)
            if self.k_cache is not None and tuple(self.k_cache.shape) == shape:
                self.k_cache.zero_()
                self.v_cache.zero_()
                return
            self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
            self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
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
            mask = self.causal[input_pos][None, None]  # (1, 1, s, max_len): key position <= query position
            for i, L in enumerate(self.layers):
                qkv = F.linear(F.layer_norm(x, (self.n_embd,), L.ln_1_weight, L.ln_1_bias, self.eps),
                               L.attn_c_attn_weight, L.attn_c_attn_bias)  # (b, s, 3 * h * d)
                q, k, v = qkv.view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)  # each (b, h, s, d)
                self.k_cache[i].index_copy_(2, input_pos, k)
                self.v_cache[i].index_copy_(2, input_pos, v)
                y = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask,
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


class _Runner:
    """Shared setup: model, compiled step functions, the logits check, byte counts for the roofline."""

    def __init__(self, config, params_fp32: dict[str, np.ndarray], *, dtype: str, device: str, compiled: bool,
                 seed: int = 0):
        import torch

        self.config, self.device, self.compiled, self.seed = config, device, bool(compiled), seed
        self.variant = "torch-compile" if compiled else "torch-eager"
        self.model = GptFast(config, params_fp32, dtype=dtype, device=device)
        self.cuda = str(device).startswith("cuda")
        self.compile_mode = ("reduce-overhead" if self.cuda else "default") if compiled else None
        size = np.dtype(dtype).itemsize
        self.weight_bytes = int(sum(v.size * size for k, v in params_fp32.items() if not k.endswith("wpe.weight")))
        self.kv_bytes_per_token = 2 * config.n_layer * config.n_embd * size
        self._torch = torch
        if self.cuda:
            # torch 2.11 picks cuDNN's SDPA for the masked attention here, and inductor runs it as
            # a fallback kernel: on an H200 (2026-12-01) the decode step took 0.84 ms at b8 and
            # 2.2 ms at b32 with it (scripts/peer_diag.py), far behind what gpt-fast reaches. The
            # peer is meant to be strong, so it uses the flash / memory-efficient / math backends,
            # the ones gpt-fast was written against. Process-wide, and only in a bench process.
            torch.backends.cuda.enable_cudnn_sdp(False)

    def _compile(self, fn, *, graphs: bool):
        """torch.compile ``fn`` (fullgraph, static shapes); CUDA graphs only when ``graphs`` on CUDA."""
        if not self.compiled:
            return fn
        mode = "reduce-overhead" if graphs and self.cuda else None
        return self._torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)

    def _sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize(self.device)

    def _tokens(self, batch: int, length: int):
        g = self._torch.Generator().manual_seed(self.seed)
        return self._torch.randint(0, self.config.vocab_size, (batch, length), generator=g).to(self.device)

    def _prefill(self, ids, fn=None):
        """A fresh cache sized to ``ids`` (+ room set by the caller) and its prefill: logits (b, vocab)."""
        pos = self._torch.arange(ids.shape[1], device=self.device)
        with self._torch.inference_mode():
            return (self.model if fn is None else fn)(ids, pos)

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
    the argmax on the device and feeds the next step from it (no host copy)."""

    def __init__(self, config, params_fp32, *, dtype: str, device: str, compiled: bool, seed: int = 0,
                 compile_prefill: bool = True):
        super().__init__(config, params_fp32, dtype=dtype, device=device, compiled=compiled, seed=seed)
        self._step_fn = self._compile(self._decode_one, graphs=True)
        # start()'s prefill is untimed here: compile_prefill=False saves a compile per shape.
        self._prefill_fn = self._compile(self.model, graphs=False) if compile_prefill else self.model
        self._next = self._pos = None
        self._max_len = self._host_pos = 0

    def _decode_one(self, ids, input_pos):
        return self.model(ids, input_pos).argmax(dim=-1, keepdim=True)  # (b, 1)

    def _decode_sdpa(self):
        """SDPA's math backend for the one-token step, as gpt-fast's ``decode_n_tokens`` does:
        inductor then compiles the masked one-query attention into its own fused kernels. With
        the default choice torch 2.11 takes cuDNN's or the memory-efficient kernel, each a
        fallback kernel that inductor cannot fuse, slow for one query row (2026-12-01, H200: our
        peer's b32 step took 2.36 ms against the 0.63 ms issue 11 reports for gpt-fast-style)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel

        return sdpa_kernel(SDPBackend.MATH)

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
        self._next = logits.argmax(dim=-1, keepdim=True)  # (b, 1)
        self._pos = torch.tensor([ids.shape[1]], device=self.device)
        self._host_pos = ids.shape[1]
        self._sync()

    def step(self):
        """One decode step of the batch: the next ids (b, 1) on the device."""
        if self._next is None:
            raise RuntimeError("start() first")
        if self._host_pos >= self._max_len:
            raise RuntimeError(f"the static cache holds {self._max_len} positions: start() again")
        with self._torch.inference_mode(), self._decode_sdpa():
            if self.compiled and self.cuda:
                self._torch.compiler.cudagraph_mark_step_begin()
            # The output lives in the CUDA graph's static memory, overwritten by the next replay:
            # keep a copy (gpt-fast clones it too). The position moves on the device.
            self._next = self._step_fn(self._next, self._pos).clone()
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
    with static shapes; the cache is sized to the prompt."""

    def __init__(self, config, params_fp32, *, dtype: str, device: str, compiled: bool, seed: int = 0):
        super().__init__(config, params_fp32, dtype=dtype, device=device, compiled=compiled, seed=seed)
        self._fn = self._compile(self.model, graphs=False)
        self._ids = None

    def prepare(self, *, batch: int, seq_len: int) -> None:
        self._ids = self._tokens(batch, seq_len)
        self.model.setup_cache(batch, seq_len)
        self._sync()

    def run(self) -> Any:
        return self._prefill(self._ids, self._fn)

    def cleanup(self) -> None:
        self._ids = None
