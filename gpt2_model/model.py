"""GPT-2 in ``tvm.relax.frontend.nn``, attention through TVM's paged KV cache.

Module and parameter names follow Hugging Face (``transformer.h.0.attn.c_attn.weight``...), so
the loader is an identity map plus the Conv1D transposes. ``lm_head`` is tied to ``wte``: one
weight is stored and both the embedding lookup and the output projection read it.

Linear layers come from :mod:`gpt2_model.quantization`, which decides the stored form of each
weight (fp32 / fp16 / 4-bit groups) and how it is turned back into a matrix inside the kernel.
"""

from __future__ import annotations


from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from .config import GPT2Config
from .norm_gemv import NormGemvKey
from .norm_gemv_plan import NormGemvPlan
from .quantization import QuantScheme, TiedEmbedding, make_embedding, make_linear
from .step_mark import MARK_FUNC
from .wgmma_gemm import GemmKey
from .wgmma_plan import GemmPlan

# pylint: disable=invalid-name,missing-function-docstring


class GPT2Attention(nn.Module):
    """Fused-QKV self attention; the attention itself runs in the KV cache's kernels."""

    def __init__(self, config: GPT2Config, scheme: QuantScheme, layer_id: int):
        self.num_heads = config.n_head
        self.head_dim = config.head_dim
        self.layer_id = layer_id
        embed = config.n_embd
        self.c_attn = make_linear(scheme, embed, 3 * embed, bias=True)
        self.c_proj = make_linear(scheme, embed, embed, bias=True)
        # softmax(q k^T * sm_scale): HF divides by sqrt(head_dim) when scale_attn_weights and,
        # with scale_attn_by_inverse_layer_idx, also by (layer_idx + 1).
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_id + 1)
        self.sm_scale = scale

    def forward(self, x: Tensor, kv_cache: PagedKVCache) -> Tensor:
        return self.c_proj(self.attend(self.c_attn(x), kv_cache))

    def attend(self, qkv: Tensor, kv_cache: PagedKVCache) -> Tensor:
        """Attention of the fused QKV activations (b, s, 3 * h * d): (b, s, h * d), before ``c_proj``."""
        b, s, _ = qkv.shape
        h, d = self.num_heads, self.head_dim
        qkv = op.reshape(qkv, (b, s, 3 * h, d))
        out = kv_cache.attention_with_fused_qkv(self.layer_id, qkv, h, sm_scale=self.sm_scale)
        return op.reshape(out, (b, s, h * d))  # (b, s, h * d)


class GPT2MLP(nn.Module):
    """c_fc -> gelu (tanh approximation for gelu_new) -> c_proj."""

    def __init__(self, config: GPT2Config, scheme: QuantScheme):
        self.c_fc = make_linear(scheme, config.n_embd, config.n_inner, bias=True)
        self.c_proj = make_linear(scheme, config.n_inner, config.n_embd, bias=True)
        self.activation = config.activation_function

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.activate(self.c_fc(x)))

    def activate(self, x: Tensor) -> Tensor:
        if self.activation in ("gelu_new", "gelu_pytorch_tanh"):
            x = op.gelu(x, approximate="tanh")
        elif self.activation == "gelu":
            x = op.gelu(x)
        else:
            x = op.relu(x)
        return x

    @property
    def fusable_epilogue(self) -> str | None:
        """The fused norm + GEMV epilogue of ``c_fc`` + activation (None: no such epilogue)."""
        return "bias_gelu" if self.activation in ("gelu_new", "gelu_pytorch_tanh") else None


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, scheme: QuantScheme, layer_id: int):
        dtype = scheme.activation_dtype
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype)
        self.attn = GPT2Attention(config, scheme, layer_id)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype)
        self.mlp = GPT2MLP(config, scheme)

        self.norm_gemv: NormGemvPlan | None = None  # decode shapes whose norm runs inside the next GEMV
        self.gemm: GemmPlan | None = None  # prefill chunk shapes whose GEMMs run the wgmma kernel

    def forward(self, x: Tensor, kv_cache: PagedKVCache) -> Tensor:
        qkv = fused_norm_linear(self.norm_gemv, self.ln_1, self.attn.c_attn, x, "bias")
        if qkv is None:
            h = self.ln_1(x)
            qkv = self._template_linear(self.attn.c_attn, h, "bias")
            if qkv is None:
                qkv = self.attn.c_attn(h)
        a = self.attn.attend(qkv, kv_cache)
        x = self._residual_out(self.attn.c_proj, a, x)
        epilogue = self.mlp.fusable_epilogue
        h = fused_norm_linear(self.norm_gemv, self.ln_2, self.mlp.c_fc, x, epilogue)
        if h is None:
            n = self.ln_2(x)
            h = self._template_linear(self.mlp.c_fc, n, epilogue) if epilogue is not None else None
            if h is None:
                h = self.mlp.activate(self.mlp.c_fc(n))
        return self._residual_out(self.mlp.c_proj, h, x)

    def _template_linear(self, linear: nn.Module, h: Tensor, epilogue: str) -> Tensor | None:
        """``epilogue(linear(h))`` on a template kernel: the wgmma kernel where ``gemm`` names the shape (a
        prefill chunk, or a decode batch whose wgmma entry was stored only after it beat the kernel the
        build ran before, the norm + GEMV template's plain kernel included), else that plain kernel where
        ``norm_gemv`` names it; None: the layer's own kernels."""
        out = gemm_linear(self.gemm, linear, h, epilogue)
        return out if out is not None else plain_linear(self.norm_gemv, linear, h, epilogue)

    def _residual_out(self, linear: nn.Module, h: Tensor, residual: Tensor) -> Tensor:
        """``residual + linear(h)``: the wgmma kernel where ``gemm`` names the shape, else the decode
        template's plain kernel where ``norm_gemv`` does (see :meth:`_template_linear`), else the layer
        and the add (fused by the partition)."""
        out = gemm_linear(self.gemm, linear, h, "bias_residual", residual=residual)
        if out is None:
            out = residual_linear(self.norm_gemv, linear, h, residual)
        return out if out is not None else residual + linear(h)


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config, scheme: QuantScheme):
        self.wte = make_embedding(scheme, config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd, dtype=scheme.activation_dtype)
        self.h = nn.ModuleList([GPT2Block(config, scheme, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=scheme.activation_dtype)

    def forward(self, embeds: Tensor, kv_cache: PagedKVCache, *, final_norm: bool = True,
                positioned: bool = False) -> Tensor:
        """The last layer's output, through ``ln_f`` unless ``final_norm`` is False (the caller
        fuses it into the lm_head). ``positioned``: ``embeds`` already hold the position embeddings
        (:meth:`embed_tokens`)."""
        x = embeds if positioned else embeds + self._positions(kv_cache, embeds.shape)
        for block in self.h:
            x = block(x, kv_cache)
        # The step mark (gpt2_model.step_mark): after the last attention, the host may start the
        # next step's KV-cache copy; a copy of x on the way to the final layer norm.
        x = op.extern(MARK_FUNC, [x], out=Tensor.placeholder(x.shape, x.dtype, "step_mark"))
        return self.ln_f(x) if final_norm else x

    def _positions(self, kv_cache: PagedKVCache, shape) -> Tensor:
        """wpe rows of the step's query positions (from the KV cache: each slot's index in its sequence)."""
        positions = kv_cache.get_query_positions(shape[0] * shape[1])  # (b*s,)
        return op.reshape(self.wpe(positions), shape)  # (b, s, n_embd)

    def embed_tokens(self, input_ids: Tensor, kv_cache: PagedKVCache, b, s) -> Tensor:
        """wte[ids] + wpe[positions] as the (b, s, n_embd) input of the first block: one gather-add
        kernel for an unquantized table (the two lookups and the add were three kernels)."""
        d = self.wpe.weight.shape[1]
        if not isinstance(self.wte, TiedEmbedding):
            return op.reshape(self.wte(input_ids), (b, s, d)) + self._positions(kv_cache, (b, s, d))
        positions = kv_cache.get_query_positions(b * s)  # (b*s,)
        x = op.tensor_expr_op(_embed_sum, "take_embed", [self.wte.weight, self.wpe.weight, input_ids, positions])
        return op.reshape(x, (b, s, d))


class GPT2LMHeadModel(nn.Module):
    """The exported model: embed / prefill / decode / batch_* / create_paged_kv_cache."""

    def __init__(self, config: GPT2Config, scheme: QuantScheme, target: Target, norm_gemv: NormGemvPlan | None = None,
                 gemm: GemmPlan | None = None):
        self.config = config
        self.scheme = scheme
        self.target = target
        self.dtype = scheme.activation_dtype
        self.transformer = GPT2Model(config, scheme)
        # Fused layer norm + GEMV kernels for the decode shapes the plan names (gpt2_model.norm_gemv;
        # CUDA targets only: the kernels are written for CUDA threads)
        self.norm_gemv = norm_gemv if norm_gemv is not None and (target.kind.name == "cuda" or norm_gemv.reference) else None
        # Hopper wgmma GEMMs for the prefill chunk shapes the plan names (gpt2_model.wgmma_gemm)
        self.gemm = gemm if gemm is not None and (target.kind.name == "cuda" or gemm.reference) else None
        for block in self.transformer.h:
            block.norm_gemv = self.norm_gemv
            block.gemm = self.gemm

    # ---------------------------------------------------------------- pieces
    def _lm_head(self, hidden: Tensor) -> Tensor:
        """Tied output projection: hidden @ wte^T, logits in fp32."""
        logits = self.transformer.wte.lm_head(hidden)  # (b, s, vocab)
        if logits.dtype != "float32":
            logits = logits.astype("float32")
        return logits

    def embed(self, input_ids: Tensor):
        return self.transformer.wte(input_ids)  # (seq_len, n_embd)

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache, *, positioned: bool = False):
        # the final norm on the last position only (it is per row): one row, not s, and at one row
        # it can run inside the lm_head's kernel (the fused b1 pair, where planned)
        hidden = self.transformer(input_embed, paged_kv_cache, final_norm=False, positioned=positioned)  # (1, s, d)
        hidden = op.tensor_expr_op(_last_position, name_hint="index", args=[hidden])  # (1, 1, n_embd)
        return self._final_logits(hidden), paged_kv_cache

    def _final_logits(self, hidden: Tensor) -> Tensor:
        """``lm_head(ln_f(hidden))`` (b, 1, vocab) fp32: one fused kernel where planned."""
        logits = norm_linear(self.norm_gemv, self.transformer.ln_f, self.transformer.wte, hidden, "none",
                             out_dtype="float32")
        return logits if logits is not None else self._lm_head(self.transformer.ln_f(hidden))

    def _decode_logits(self, embeds: Tensor, paged_kv_cache: PagedKVCache, *, positioned: bool = False) -> Tensor:
        """Logits (b, 1, vocab) fp32 of a decode step."""
        return self._final_logits(self.transformer(embeds, paged_kv_cache, final_norm=False, positioned=positioned))

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._decode_logits(input_embed, paged_kv_cache), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self.transformer(input_embeds, paged_kv_cache, final_norm=False)  # (1, total, n_embd)
        hidden = op.take(hidden, logit_positions, axis=1)  # (1, batch, n_embd): the norm on these rows only
        return self._lm_head(self.transformer.ln_f(hidden)), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._decode_logits(input_embeds, paged_kv_cache), paged_kv_cache

    # Token in, token out: the whole step on the device (embedding lookup .. greedy argmax), so a
    # decode loop feeds step n+1 with step n's output and never waits for the host. The logits
    # come out too (the lm_head + cast kernel writes them anyway; the argmax reads them).
    def prefill_tokens(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        """input_ids (s,) -> (next id (1,) int32, last logits (1, 1, vocab) fp32)."""
        x = self.transformer.embed_tokens(input_ids, paged_kv_cache, 1, input_ids.shape[0])  # (1, s, n_embd)
        logits, paged_kv_cache = self.prefill(x, paged_kv_cache, positioned=True)
        return (greedy(logits), logits), paged_kv_cache

    def batch_decode_tokens(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        """input_ids (b,) -> (next ids (b,) int32, logits (b, 1, vocab) fp32)."""
        x = self.transformer.embed_tokens(input_ids, paged_kv_cache, input_ids.shape[0], 1)  # (b, 1, n_embd)
        logits = self._decode_logits(x, paged_kv_cache, positioned=True)
        return (greedy(logits), logits), paged_kv_cache

    def create_paged_kv_cache(  # pylint: disable=too-many-arguments
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.config
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, c.n_layer]),
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_head,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE,  # GPT-2 adds learned positions (wpe) instead of RoPE
            rope_scale=1,
            rope_theta=1,
            rope_scaling={},
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
        )

    def get_default_spec(self, buckets: dict[str, list[int]] | None = None, *, debug: bool = False) -> nn.spec.ModuleSpec:
        """The exported interface; ``buckets`` adds static-shape entry points.

        ``buckets={"decode": [8], "prefill": [1024]}`` adds ``batch_decode_b8`` (batch of exactly
        8) and ``prefill_s1024`` (a chunk of exactly 1024 tokens): the same computation with the
        symbolic dim bound, so MetaSchedule can tune its kernels and the runtime calls them when
        the step's shape equals the bucket (the symbolic functions serve every other shape).

        ``debug=True`` exports the compute functions with ``effect_mode="packed"``: they take the
        IO effects (from ``_initialize_effect``) after their inputs and return ``(outputs,
        effects)``, which is what lets ``op.print_`` print at run time (the Engine threads them).
        """
        d, dtype = self.config.n_embd, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "packed" if debug else "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", d], dtype), "paged_kv_cache": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, d], dtype), "paged_kv_cache": kv, "$": packed},
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", d], dtype),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_decode": {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, d], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "prefill_tokens": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "paged_kv_cache": kv, "$": packed},
            "batch_decode_tokens": {"input_ids": nn.spec.Tensor(["batch_size"], "int32"), "paged_kv_cache": kv,
                                    "$": packed},
            "create_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        for batch in (buckets or {}).get("decode", []):
            name = bucket_function("decode", batch, tokens=False)
            object.__setattr__(self, name, self.batch_decode)
            spec[name] = {"input_embeds": nn.spec.Tensor([batch, 1, d], dtype), "paged_kv_cache": kv, "$": packed}
            name = bucket_function("decode", batch)
            object.__setattr__(self, name, self.batch_decode_tokens)
            spec[name] = {"input_ids": nn.spec.Tensor([batch], "int32"), "paged_kv_cache": kv, "$": packed}
        for length in (buckets or {}).get("prefill", []):
            name = bucket_function("prefill", length, tokens=False)
            object.__setattr__(self, name, self.prefill)
            spec[name] = {"input_embed": nn.spec.Tensor([1, length, d], dtype), "paged_kv_cache": kv, "$": packed}
            name = bucket_function("prefill", length)
            object.__setattr__(self, name, self.prefill_tokens)
            spec[name] = {"input_ids": nn.spec.Tensor([length], "int32"), "paged_kv_cache": kv, "$": packed}
        return nn.spec.ModuleSpec.from_raw(spec, self)


def _embed_sum(wte, wpe, ids, positions):
    """(n, d): wte[ids[i]] + wpe[positions[i]] (the first block's input, one gather-add)."""
    n, d = ids.shape[0], wte.shape[1]
    return te.compute((n, d), lambda i, k: wte[ids[i], k] + wpe[positions[i], k], name="take_embed")


def _last_position(x):
    """x[:, -1:, :] as a TE compute (the prefill's last hidden state)."""
    b, s, d = x.shape
    return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="index")


#: Chunks each logits row is split into by the first stage of the greedy argmax.
ARGMAX_CHUNKS = 64



def _argmax_partial(logits):
    """Greedy sampling, first stage: (b, 1, vocab) logits -> (b, C) int64, for each chunk of the row
    the FIRST index holding the chunk's max (vocab where none: a chunk of NaNs, or past the row).

    Two plain reductions over a chunk -- the max, then the smallest index holding it -- and an
    elementwise epilogue: the softmax-like shape dlight's GeneralReduction schedules with a thread
    block per (row, chunk), b x 64 blocks of ~800 values instead of one block per 50k-value row (a
    tuple-valued argmax reducer, or a kernel ending in a reduction, falls back to one thread per
    row). MetaSchedule tunes it like any reduction.
    """
    b, _, vocab = logits.shape
    vocab = int(vocab)
    chunks = min(ARGMAX_CHUNKS, vocab)
    length = -(-vocab // chunks)
    low = tirx.min_value(logits.dtype)

    def at(i, c, l):  # the value at chunk offset l, -inf raised to the lowest finite value (te.max's
        j = c * length + l  # identity: an all -inf row then gives index 0, as NumPy); past the row: that too
        return tirx.Select(j < vocab, tirx.max(logits[i, 0, tirx.min(j, vocab - 1)], low), low)

    k = te.reduce_axis((0, length), name="k")
    part_max = te.compute((b, chunks), lambda i, c: te.max(at(i, c, k), axis=k), name="argmax_part_max")
    # The index reductions run in int64, the dtype of the module's loop variables: an int32 one gets
    # its cast hoisted around the min by the relax passes (cast(min(cast(acc), j))), which no
    # cross-thread reducer matches, and the CUDA build fails. The cast to int32 is the last stage's.
    l = te.reduce_axis((tirx.const(0, "int64"), tirx.const(length, "int64")), name="l")
    first = te.compute(
        (b, chunks),
        lambda i, c: te.min(tirx.Select(tirx.all(c * length + l < vocab, at(i, c, l) == part_max[i, c]),
                                        c * length + l, tirx.const(vocab, "int64")), axis=l),
        name="argmax_part_first")
    return te.compute((b, chunks), lambda i, c: first[i, c], name="argmax_part_index")


def _argmax_merge(logits, part_index):
    """Greedy sampling, second stage: the chunks' first indices of their max -> (b,) int32, the FIRST
    index of each row's max (the numpy / torch tie rule: the first chunk holding the max, its first
    index). The chunk maxima are read back from the logits. Both stages raise every value to at
    least the lowest finite one: -inf and NaN count as that (a row of them gives index 0, NumPy's
    answer for a row of -inf or of NaN; a NaN beside real values is never picked). The result is
    clamped to vocab - 1: the next step's embedding lookup never reads past the table."""
    b, chunks = part_index.shape
    vocab = int(logits.shape[-1])

    low = tirx.min_value(logits.dtype)

    last = tirx.const(vocab - 1, "int64")

    def value(i, c):  # the chunk's max as the first stage saw it (the lowest value for a chunk without one)
        idx = part_index[i, c]
        return tirx.Select(idx <= last, tirx.max(logits[i, 0, tirx.min(idx, last)], low), low)

    c = te.reduce_axis((0, chunks), name="c")
    row_max = te.compute((b,), lambda i: te.max(value(i, c), axis=c), name="argmax_max")
    d = te.reduce_axis((0, chunks), name="d")
    first = te.compute(
        (b,), lambda i: te.min(tirx.Select(tirx.all(part_index[i, d] <= last, value(i, d) == row_max[i]),
                                           part_index[i, d], tirx.const(vocab, "int64")), axis=d),
        name="argmax_index")
    return te.compute((b,), lambda i: tirx.min(first[i], last).astype("int32"), name="argmax")


def greedy(logits: Tensor) -> Tensor:
    """Greedy next token of each row of ``logits`` (b, 1, vocab) on the device: (b,) int32 (two
    kernels: :func:`_argmax_partial` per chunk of the row, :func:`_argmax_merge` per row)."""
    part_index = op.tensor_expr_op(_argmax_partial, name_hint="argmax_partial", args=[logits])
    return op.tensor_expr_op(_argmax_merge, name_hint="argmax", args=[logits, part_index])


def bucket_function(phase: str, value: int, *, tokens: bool = True) -> str:
    """Name of the static-shape entry point of a bucket.

    ``tokens=True`` (what the partition tunes and what generation runs): the token-in/token-out
    step, ``batch_decode_tokens_b8`` / ``prefill_tokens_s1024``. ``tokens=False``: the
    embeddings-in/logits-out step, ``batch_decode_b8`` / ``prefill_s1024``. Both are exported for
    every bucket; the token step holds every kernel of the logits step plus the embedding lookup
    and the argmax, and shares the layer kernels (same PrimFuncs, so one tuned record serves both).
    """
    if phase == "decode":
        return f"batch_decode_tokens_b{value}" if tokens else f"batch_decode_b{value}"
    return f"prefill_tokens_s{value}" if tokens else f"prefill_s{value}"


def _one_token_rows(x: Tensor) -> int | None:
    """The batch of a static (b, 1, d) activation, else None (the templates take only those)."""
    b, s, _ = x.shape
    return b if isinstance(b, int) and isinstance(s, int) and s == 1 else None


def _template_call(plan: NormGemvPlan, key: NormGemvKey, args: list, *, name: str, eps: float = 0.0) -> Tensor | None:
    """The plan's kernel for ``key`` called on ``args`` (output (b, 1, n)), or None when the plan
    does not name ``key``."""
    cfg = plan.config_for(key)
    if cfg is None:
        return None
    return op.tensor_ir_op(plan.make(key, cfg, eps=eps, name=name), name, args=args,
                           out=Tensor.placeholder((key.batch, 1, key.n), key.out_dtype))


def _norm_gemv_key(plan: NormGemvPlan | None, linear: nn.Module, x: Tensor, epilogue: str | None,
                   out_dtype: str | None, prologue: str) -> NormGemvKey | None:
    """The template's key for ``linear`` on ``x`` (static one-token rows, an unquantized weight, the bias
    as ``epilogue`` needs), or None when the template cannot take it."""
    b = _one_token_rows(x) if plan is not None and epilogue is not None else None
    weight = getattr(linear, "weight", None)
    bias = getattr(linear, "bias", None) if epilogue != "none" else None
    if b is None or not isinstance(weight, nn.Parameter) or (epilogue != "none") != (bias is not None):
        return None  # (quantized layers keep their own kernels)
    return NormGemvKey(batch=b, k=int(x.shape[2]), n=int(weight.shape[0]), epilogue=epilogue, dtype=str(x.dtype),
                       out_dtype=out_dtype or str(x.dtype), prologue=prologue)


def _linear_tail(linear: nn.Module, epilogue: str) -> list:
    return [linear.bias] if epilogue != "none" else []


def fused_norm_linear(plan: NormGemvPlan | None, norm: nn.LayerNorm, linear: nn.Module, x: Tensor,
                      epilogue: str | None, *, out_dtype: str | None = None) -> Tensor | None:
    """``linear(norm(x))`` (+ the epilogue) as one fused kernel (:mod:`gpt2_model.norm_gemv`) where
    ``plan`` names this static decode shape in its fused form, else None.

    ``linear`` is an unquantized ``nn.Linear`` (its bias per ``epilogue``) or the tied embedding
    (``epilogue="none"``: its table is the weight). Only static shapes of one token per row.
    """
    key = _norm_gemv_key(plan, linear, x, epilogue, out_dtype, "norm")
    if key is None:
        return None
    return _template_call(plan, key, [x, norm.weight, norm.bias, linear.weight] + _linear_tail(linear, epilogue),
                          name=f"norm_gemv_{key.name()}", eps=float(norm.eps))


def plain_linear(plan: NormGemvPlan | None, linear: nn.Module, h: Tensor, epilogue: str | None,
                 *, out_dtype: str | None = None) -> Tensor | None:
    """``linear(h)`` (+ the epilogue) on the norm + GEMV template's plain kernel (no norm: ``h`` is
    normalized already) where ``plan`` names this static decode shape in that form, else None."""
    key = _norm_gemv_key(plan, linear, h, epilogue, out_dtype, "none")
    if key is None:
        return None
    return _template_call(plan, key, [h, linear.weight] + _linear_tail(linear, epilogue), name=f"gemv_{key.name()}")


def norm_linear(plan: NormGemvPlan | None, norm: nn.LayerNorm, linear: nn.Module, x: Tensor, epilogue: str | None,
                *, out_dtype: str | None = None) -> Tensor | None:
    """``linear(norm(x))`` (+ the epilogue): the fused kernel (:func:`fused_norm_linear`) where ``plan``
    names this static decode shape, or the norm and then the template's plain kernel where the plan names
    the plain form instead (:func:`plain_linear`), else None (the caller runs the two layers)."""
    fused = fused_norm_linear(plan, norm, linear, x, epilogue, out_dtype=out_dtype)
    if fused is not None:
        return fused
    plain = _norm_gemv_key(plan, linear, x, epilogue, out_dtype, "none")
    if plain is None or plan.config_for(plain) is None:
        return None  # (no norm kernel emitted for nothing)
    return plain_linear(plan, linear, norm(x), epilogue, out_dtype=out_dtype)


def residual_linear(plan: NormGemvPlan | None, linear: nn.Module, h: Tensor, residual: Tensor) -> Tensor | None:
    """``residual + linear(h)`` as one kernel of :mod:`gpt2_model.norm_gemv` (its tensor-core GEMV with
    the bias and residual in the epilogue) where ``plan`` names this static decode shape, else None."""
    key = _norm_gemv_key(plan, linear, h, "bias_residual", None, "none")
    if key is None:
        return None
    return _template_call(plan, key, [h, linear.weight, linear.bias, residual], name=f"gemv_{key.name()}")


def gemm_linear(plan: GemmPlan | None, linear: nn.Module, x: Tensor, epilogue: str,
                residual: Tensor | None = None) -> Tensor | None:
    """``epilogue(linear(x))`` (``bias_residual``: + ``residual``) on the Hopper wgmma kernel
    (:mod:`gpt2_model.wgmma_gemm`) where ``plan`` names this static shape -- one sequence of a prefill
    chunk bucket, ``(1, s, k)``, or a decode batch bucket of one token per row, ``(b, 1, k)`` --
    else None (the caller runs the layer as usual). Unquantized layers with a bias only."""
    if plan is None:
        return None
    b, s, k = x.shape
    weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
    if not (isinstance(b, int) and isinstance(s, int)) or not isinstance(weight, nn.Parameter) or bias is None:
        return None
    if b != 1 and s != 1:
        return None
    rows = b != 1  # a decode batch (b, 1, k); (1, s, k) is a prefill chunk (s = 1 included)
    key = GemmKey(m=b if rows else s, n=int(weight.shape[0]), k=int(k), epilogue=epilogue, dtype=str(x.dtype),
                  rows=rows)
    cfg = plan.config_for(key)
    if cfg is None:
        return None
    name = f"wgmma_{key.name()}"
    args = [x, weight, bias] + ([residual] if residual is not None else [])
    return op.tensor_ir_op(plan.make(key, cfg, name=name), name, args=args,
                           out=Tensor.placeholder(key.shape_out(), key.dtype))
