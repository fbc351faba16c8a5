"""Run a compiled GPT-2: sequences in a paged KV cache, chunked prefill, batched decode, greedy
generation.

This module loads and runs a built library; building one is :mod:`tuning.engine`'s job
(``engine_from_hf``, ``engine_from_config``, ``build_engine``). Typical use::

    engine = Engine(exported=exported, executable=lib, params=params, device="cpu")
    seq = engine.add_sequence()
    logits = engine.prefill(seq, [464, 3290])          # (vocab,)
    logits = engine.decode([seq], [int(logits.argmax())])  # (1, vocab)
    engine.generate([464, 3290], max_new_tokens=8)      # greedy token ids

Two ways to step. ``prefill`` / ``decode`` take host token ids and return host logits (what the
HF comparisons use). ``prefill_tokens`` / ``decode_tokens`` run the token-in/token-out entry points
(embedding lookup .. greedy argmax in the library) and return the next ids as a *device* tensor
that the next ``decode_tokens`` takes as it is: ``generate`` loops on them with no host round trip
per step (see :meth:`Engine.decode_tokens` for why feeding a step's output back is safe under
CUDA graphs).

The KV cache holds ``max_total_seq_len`` tokens over all sequences, in pages of ``page_size``
tokens; a sequence of ``L`` tokens occupies ``ceil(L / page_size)`` pages. Every step checks that
the pages it needs are free *before* it touches the cache (:class:`KVCacheFullError` names the
tokens needed and free), and a step that fails anyway is rolled back, so a sequence is never left
half-extended.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import numpy as np
import tvm
from tvm import relax

from .config import GPT2Config
from .cuda_graph import IdHistory, StepGraphs, has_static_storage, regions_without_graphs
from .device import tvm_device
from .export import ExportedModel
from .model import bucket_function
from .step_mark import recording
from .wgmma_build import install_compile_hook

logger = logging.getLogger(__name__)

install_compile_hook()  # libraries holding wgmma kernels compile for sm_90a when loaded (gpt2_model.wgmma_build)

DEFAULT_PAGE_SIZE = 16


class ContextWindowError(ValueError):
    """A sequence would grow past the model's context window."""


class EngineError(ValueError):
    """Bad input to the engine (unknown sequence, token id out of range, ...)."""


class KVCacheFullError(EngineError):
    """A step needs more KV-cache pages than are free (checked before the cache is touched)."""

#: generate(stop_at_eos=True) copies the new ids to the host every this many steps to look for EOS.
EOS_CHECK_EVERY = 16


class Engine:  # pylint: disable=too-many-instance-attributes
    """A loaded library + weights + paged KV cache.

    Parameters
    ----------
    exported, executable, params
        The exported model, its built library and its weights (in the stored form).
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    max_batch_size : int, optional
        Most sequences at once (default: the config's ``max_batch_size``).
    max_total_seq_len : int, optional
        KV-cache size in tokens, all sequences together (rounded up to whole pages). Default:
        ``context_window_size * min(max_batch_size, 8)``, i.e. eight full-length sequences (or
        ``max_batch_size`` if fewer) -- not ``max_batch_size`` full ones, which for the large
        presets would not fit in memory. A step that needs more than is free raises
        :class:`KVCacheFullError` before anything changes.
    page_size : int
        Tokens per KV-cache page: 16, the page size TVM's KV-cache kernels are compiled for
        (anything else is refused: the kernels would not accept the cache).
    cuda_graph : bool
        On a GPU, run the token steps of bucket shapes (:meth:`decode_tokens`,
        :meth:`prefill_tokens`, :meth:`generate`) as whole-step CUDA graphs
        (:mod:`gpt2_model.cuda_graph`; the library must be built with ``cuda_graph=True``). Their
        outputs are then valid until the next step. Ignored on the CPU.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        *,
        exported: ExportedModel,
        executable,
        params: dict[str, np.ndarray],
        device: str = "cpu",
        target: tvm.target.Target | None = None,
        max_batch_size: int | None = None,
        max_total_seq_len: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        cuda_graph: bool = False,
    ):
        self.exported = exported
        self.config: GPT2Config = exported.config
        self.target = target
        self.device_name = device
        self.device = tvm_device(device)
        self._gpu = self.device.dlpack_device_type() != tvm.cpu(0).dlpack_device_type()  # see _step: the copy-stream wait
        max_batch_size = max_batch_size or exported.config.max_batch_size
        use_graphs = bool(cuda_graph and self._gpu and has_static_storage(executable))
        self.graphs = StepGraphs(self.device, max_batch_size=max_batch_size) if use_graphs else None
        with regions_without_graphs() if self.graphs else contextlib.nullcontext():
            self.vm = relax.VirtualMachine(executable, self.device)
        self.params = self._upload(params)
        # A debug export threads IO effects (op.print_) through every compute function.
        self._effects = self.vm["_initialize_effect"]() if exported.metadata.get("debug") else None
        c = self.config
        self.max_batch_size = max_batch_size
        self.max_total_seq_len = max_total_seq_len or c.context_window_size * min(self.max_batch_size, 8)
        if int(page_size) < 1 or int(self.max_total_seq_len) < 1:
            raise EngineError(f"page_size ({page_size}) and max_total_seq_len ({self.max_total_seq_len}) must be >= 1")
        if int(page_size) != DEFAULT_PAGE_SIZE:
            raise EngineError(f"page_size must be {DEFAULT_PAGE_SIZE}: TVM's KV-cache kernels (append, attention) are "
                              f"compiled for {DEFAULT_PAGE_SIZE}-token pages, got {page_size}")
        self.page_size = int(page_size)
        shape = tvm.runtime.ShapeTuple  # int arguments of an nn.spec function travel as shapes
        with self._on_stream():  # the cache launches its kernels on the stream it is created under
            self.kv_cache = self.vm["create_paged_kv_cache"](
                shape([self.max_batch_size]), shape([self.max_total_seq_len]),
                shape([c.prefill_chunk_size]), shape([self.page_size]), shape([0]),
            )
        self._f = {name: tvm.get_global_func(f"vm.builtin.kv_state_{name}") for name in
                   ("add_sequence", "remove_sequence", "begin_forward", "end_forward", "popn")}
        self._free_pages = tvm.get_global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._flush_aux = tvm.get_global_func("vm.builtin.attention_kv_cache_get_query_positions")
        self._view = tvm.get_global_func("vm.builtin.reshape")
        # Static-shape entry points of the buckets: used when a step's shape equals the bucket
        # (CUDA graphs capture them); the symbolic functions serve every other shape.
        self.buckets = {phase: sorted(int(v) for v in values)
                        for phase, values in (exported.metadata.get("buckets") or {}).items()}
        self._bucket_fns = {(phase, v): self.vm[bucket_function(phase, v, tokens=False)]
                            for phase, values in self.buckets.items() for v in values}
        # Token-in/token-out steps (libraries built before they existed lack them: generate then
        # falls back to the host-argmax loop).
        self._token_fns = {key: self._function(bucket_function(key[0], key[1]))
                           for key in self._bucket_fns}
        self._token_fns.update({("prefill", None): self._function("prefill_tokens"),
                                ("decode", None): self._function("batch_decode_tokens")})
        self._lengths: dict[int, int] = {}
        self._next_seq = 0

    def _on_stream(self):
        """Context: the engine's stream is TVM's current one (graph mode), else nothing changes."""
        return self.graphs.on_stream() if self.graphs else contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait until the device finished this engine's work."""
        if self.graphs:
            self.graphs.sync()
        else:
            self.device.sync()

    def _function(self, name: str):
        """The library function ``name``, or None if this library does not export it."""
        try:
            return self.vm[name]
        except (AttributeError, KeyError, RuntimeError, ValueError):
            return None

    @property
    def has_token_steps(self) -> bool:
        """Whether the library exports the token-in/token-out entry points."""
        return all(f is not None for f in self._token_fns.values())

    # ------------------------------------------------------------------ construction
    def _upload(self, params: dict[str, np.ndarray]) -> list:
        specs = self.exported.param_specs()
        missing = [n for n, _, _ in specs if n not in params]
        if missing:
            raise EngineError(f"parameters missing for this build: {', '.join(missing)}")
        out = []
        for name, shape, dtype in specs:
            value = params[name]
            if tuple(value.shape) != shape or str(value.dtype) != dtype:
                raise EngineError(
                    f"parameter {name} is {value.dtype}{list(value.shape)}, the build expects {dtype}{list(shape)}"
                )
            out.append(tvm.runtime.tensor(np.ascontiguousarray(value), self.device))
        return out

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        if len(self._lengths) >= self.max_batch_size:
            raise EngineError(f"at most {self.max_batch_size} sequences at once")
        seq = self._next_seq
        self._next_seq += 1
        self._f["add_sequence"](self.kv_cache, seq)
        self._lengths[seq] = 0
        return seq

    def remove_sequence(self, seq: int) -> None:
        self._check_seq(seq)
        self._f["remove_sequence"](self.kv_cache, seq)
        del self._lengths[seq]

    def sequence_length(self, seq: int) -> int:
        self._check_seq(seq)
        return self._lengths[seq]

    def _check_seq(self, seq: int) -> None:
        if seq not in self._lengths:
            raise EngineError(f"unknown sequence {seq}")

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        """Host token ids -> int32 array; non-integers (floats, bools) and out-of-range ids refused."""
        if isinstance(tokens, tvm.runtime.Tensor):
            raise EngineError("these token ids must be host integers; device ids go to decode_tokens")
        ids = np.asarray(tokens)
        if ids.size and (ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer)):
            raise EngineError(f"token ids must be integers, got {ids.dtype} values (e.g. {ids.reshape(-1)[0]!r})")
        ids = ids.astype(np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise EngineError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids.astype(np.int32)

    def free_pages(self) -> int:
        """KV-cache pages not held by any sequence."""
        return int(self._free_pages(self.kv_cache))

    def _pages(self, length: int) -> int:
        return -(-length // self.page_size)

    def check_capacity(self, seqs: Sequence[int], extra: Sequence[int]) -> None:
        """Raise :class:`KVCacheFullError` unless appending ``extra[i]`` tokens to each ``seqs[i]``
        fits in the free pages (a sequence of L tokens holds ceil(L / page_size) pages)."""
        pages = sum(self._pages(self._lengths[s] + n) - self._pages(self._lengths[s]) for s, n in zip(seqs, extra))
        free = self.free_pages()
        if pages > free:
            raise KVCacheFullError(
                f"KV cache full: this step needs {sum(extra)} more tokens ({pages} pages of {self.page_size} tokens) "
                f"but only {free} pages ({free * self.page_size} tokens) are free; the cache holds "
                f"{self.max_total_seq_len} tokens over all sequences: remove sequences or build the Engine with a "
                f"larger max_total_seq_len"
            )

    def _check_room(self, seq: int, extra: int) -> None:
        window = self.config.context_window_size
        if self._lengths[seq] + extra > window:
            raise ContextWindowError(
                f"sequence {seq} would hold {self._lengths[seq] + extra} tokens, past the context window of {window}"
            )

    # ------------------------------------------------------------------ low-level steps
    def call(self, func, *args):
        """Call a compute function of the library (params appended, effects threaded if debug)."""
        with self._on_stream(), recording(self.graphs.recorder if self.graphs else None):
            if self._effects is None:
                return func(*args, self.params)
            out, self._effects = func(*args, self._effects, self.params)
        return out

    def embed(self, ids: np.ndarray):
        """Token embeddings on the device: (n, n_embd)."""
        return self.call(self.vm["embed"], tvm.runtime.tensor(ids, self.device))

    def begin_forward(self, seqs: Sequence[int], lengths: Sequence[int]) -> None:
        self._f["begin_forward"](self.kv_cache, tvm.runtime.ShapeTuple(list(seqs)), tvm.runtime.ShapeTuple(list(lengths)))

    def end_forward(self) -> None:
        self._f["end_forward"](self.kv_cache)

    def _step(self, seqs: Sequence[int], lengths: Sequence[int], run):
        """begin_forward .. run() .. end_forward, lengths recorded only when all of it succeeded.

        On an error after begin_forward the appended tokens are popped again, so the sequences
        are exactly as before (the capacity check already ran: a full cache never gets here).
        """
        self.begin_forward(seqs, lengths)
        if self._gpu:
            # TVM's paged KV cache copies this step's auxiliary arrays (page table, positions) on
            # its own copy stream, at the first attention call, into the buffers the previous step's
            # kernels read, and that stream never waits for the compute stream (greedy q0f32 diverged
            # from HF at step 7 on an H200 without this): wait for the previous step (or for its
            # step mark, gpt2_model.step_mark) -- after this step's begin_forward, before the copy.
            if self.graphs:
                self.graphs.wait_previous()
            else:
                self.synchronize()
        marks = self.graphs.marks if self.graphs else 0
        try:
            out = run()
            self.end_forward()
        except BaseException:
            for seq, n in zip(seqs, lengths):
                try:
                    self._f["popn"](self.kv_cache, seq, int(n))
                except Exception:  # pylint: disable=broad-except
                    logger.exception("could not roll back sequence %s after a failed step", seq)
            raise
        if self.graphs:
            self.graphs.step_done(marks)
        for seq, n in zip(seqs, lengths):
            self._lengths[seq] += int(n)
        return out

    def prefill_function(self, length: int):
        """The function a prefill chunk of ``length`` tokens runs: its bucket's, else the symbolic one."""
        return self._bucket_fns.get(("prefill", length)) or self.vm["prefill"]

    def decode_function(self, batch: int):
        """The function a decode step of ``batch`` sequences runs: its bucket's, else the symbolic one."""
        return self._bucket_fns.get(("decode", batch)) or self.vm["batch_decode"]

    def run_prefill(self, embeds, length: int):
        """One prefill call (after begin_forward): embeds (1, n, d) -> logits tensor (1, 1, vocab)."""
        logits, self.kv_cache = self.call(self.prefill_function(length), embeds, self.kv_cache)
        return logits

    def run_batch_decode(self, embeds, batch: int):
        """One batched decode call (after begin_forward): embeds (b, 1, d) -> logits (b, 1, vocab)."""
        logits, self.kv_cache = self.call(self.decode_function(batch), embeds, self.kv_cache)
        return logits

    def view(self, tensor, shape: Sequence[int]):
        return self._view(tensor, tvm.runtime.ShapeTuple(list(shape)))

    def token_function(self, phase: str, size: int):
        """The token-in/token-out function of a ``phase`` step of ``size`` (batch or chunk length):
        its bucket's when ``size`` is a bucket, else the symbolic one (any size up to the limits)."""
        func = self._token_fns.get((phase, size)) or self._token_fns[(phase, None)]
        if func is None:
            raise EngineError("this library has no token-in/token-out entry points (built before they existed): "
                              "rebuild it, or use prefill()/decode()")
        return func

    # ------------------------------------------------------------------ user API
    def _check_decode_seqs(self, seqs: Sequence[int], n_tokens: int | None) -> list[int]:
        seqs = list(seqs)
        if not seqs or (n_tokens is not None and len(seqs) != n_tokens):
            raise EngineError(f"decode needs one token per sequence, got {len(seqs)} sequences and {n_tokens} tokens")
        if len(set(seqs)) != len(seqs):
            raise EngineError("a sequence appears twice in one decode step")
        for seq in seqs:
            self._check_seq(seq)
            self._check_room(seq, 1)
        self.check_capacity(seqs, [1] * len(seqs))
        return seqs

    def _check_prompt(self, seq: int, token_ids) -> np.ndarray:
        self._check_seq(seq)
        ids = self._check_tokens(token_ids)
        if ids.size == 0:
            raise EngineError("prefill needs at least one token")
        self._check_room(seq, ids.size)
        self.check_capacity([seq], [ids.size])  # the whole prompt: no chunk may fail half-way
        return ids

    def _chunks(self, ids: np.ndarray):
        chunk = self.config.prefill_chunk_size
        return [ids[start:start + chunk] for start in range(0, ids.size, chunk)]

    def prefill(self, seq: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids`` to ``seq``; logits (vocab,) of the last position, fp32.

        Prompts longer than the prefill chunk are run in chunks. If any chunk fails, the chunks
        already appended are popped again: the sequence is left as it was.
        """
        ids = self._check_prompt(seq, token_ids)
        before = self._lengths[seq]
        logits = None
        try:
            for part in self._chunks(ids):
                embeds = self.view(self.embed(part), (1, part.size, self.config.n_embd))
                logits = self._step([seq], [part.size], lambda e=embeds, n=part.size: self.run_prefill(e, n))
        except BaseException:
            self._truncate(seq, before)
            raise
        return logits.numpy().reshape(-1)

    def _truncate(self, seq: int, length: int) -> None:
        """Pop ``seq`` back to ``length`` tokens (undo the completed chunks of a failed prefill)."""
        extra = self._lengths[seq] - length
        if extra > 0:
            self._f["popn"](self.kv_cache, seq, extra)
            self._lengths[seq] = length

    def decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One step for each sequence (different lengths allowed): logits (len(seqs), vocab)."""
        ids = self._check_tokens(tokens)
        seqs = self._check_decode_seqs(seqs, ids.size)
        embeds = self.view(self.embed(ids), (len(seqs), 1, self.config.n_embd))
        logits = self._step(seqs, [1] * len(seqs), lambda: self.run_batch_decode(embeds, len(seqs)))
        return logits.numpy().reshape(len(seqs), -1)

    # ---------------------------------------------------- token in, token out (device loop)
    def prefill_tokens(self, seq: int, token_ids: Sequence[int], *, return_logits: bool = False):
        """Append ``token_ids`` to ``seq`` and pick the greedy next token on the device.

        Returns the next id as a device tensor (1,) int32 -- ready to be the next
        :meth:`decode_tokens` input -- and, with ``return_logits``, the last position's logits
        (device tensor (1, 1, vocab) fp32) too. The prompt is copied to the device once.
        """
        ids = self._check_prompt(seq, token_ids)
        before = self._lengths[seq]
        out = None
        try:
            for part in self._chunks(ids):
                if self._graph_ready("prefill", part.size):
                    out = self._graph_step("prefill", [seq], [part.size], self.graphs.load_prompt(part))
                    continue
                func = self.token_function("prefill", part.size)
                dev_ids = tvm.runtime.tensor(part, self.device)
                out = self._step([seq], [part.size], lambda f=func, i=dev_ids: self._call_tokens(f, i))
        except BaseException:
            self._truncate(seq, before)
            raise
        return out if return_logits else out[0]

    def decode_tokens(self, seqs: Sequence[int], ids, *, return_logits: bool = False):
        """One greedy step of each sequence, token ids in and out on the device.

        Parameters
        ----------
        seqs : sequence of int
            The sequences, one token each (different lengths allowed).
        ids : tvm.runtime.Tensor or sequence of int
            The tokens to append: a device tensor (b,) int32 -- normally the previous
            ``prefill_tokens`` / ``decode_tokens`` output, used as it is (no host copy, no
            synchronisation) -- or host integers (checked, then copied to the device).
        return_logits : bool
            Also return this step's logits (device tensor (b, 1, vocab) fp32).

        Returns
        -------
        tvm.runtime.Tensor
            The next ids (b,) int32 on the device (and the logits with ``return_logits``).

        Notes
        -----
        Feeding a step's output straight back is safe: with ``relax.backend.use_cuda_graph`` the
        rewrite captures only bindings with static arguments (the embedding lookup reads its
        ``input_ids`` at launch) and keeps storage that flows to the outputs out of its graphs
        (``OutputStorageCollector``), so a later replay never overwrites the ids a caller holds.
        In graph mode (``cuda_graph=True``) the outputs of a replayed step are the graph's own
        buffers, valid until the next step (:mod:`gpt2_model.cuda_graph`). Device ids are always
        in range: the argmax kernel clamps to ``vocab - 1``.
        """
        if isinstance(ids, tvm.runtime.Tensor):
            if str(ids.dtype) != "int32" or len(ids.shape) != 1:
                raise EngineError(f"device token ids must be an int32 vector (b,), got {ids.dtype}{list(ids.shape)}")
            if str(ids.device) != str(self.device):
                raise EngineError(f"device token ids live on {ids.device}, the engine on {self.device}")
            seqs = self._check_decode_seqs(seqs, int(ids.shape[0]))
            dev_ids = ids
        else:
            dev_ids = self._check_tokens(ids)
            seqs = self._check_decode_seqs(seqs, dev_ids.size)
        if self._graph_ready("decode", len(seqs)):
            out = self._graph_step("decode", seqs, [1] * len(seqs), self.graphs.load_ids(dev_ids, len(seqs)))
            return out if return_logits else out[0]
        if isinstance(dev_ids, np.ndarray):
            dev_ids = tvm.runtime.tensor(dev_ids, self.device)
        func = self.token_function("decode", len(seqs))
        out = self._step(seqs, [1] * len(seqs), lambda: self._call_tokens(func, dev_ids))
        return out if return_logits else out[0]

    def _call_tokens(self, func, dev_ids):
        (next_ids, logits), self.kv_cache = self.call(func, dev_ids, self.kv_cache)
        return next_ids, logits

    def _graph_ready(self, phase: str, size: int) -> bool:
        """Whether a ``phase`` step of ``size`` runs as a whole-step CUDA graph: graph mode, and
        ``size`` is a bucket (static shapes; other sizes run the symbolic function as usual)."""
        return bool(self.graphs and self.graphs.enabled and self._token_fns.get((phase, size)) is not None)

    def _graph_step(self, phase: str, seqs: list[int], lengths: list[int], inp):
        """A token step through :class:`~gpt2_model.cuda_graph.StepGraphs`: (next ids, logits).

        The key: phase, size, pages per sequence after the step, and which sequences are fresh
        (see :mod:`gpt2_model.cuda_graph`)."""
        size = sum(lengths) if phase == "prefill" else len(seqs)
        key = (phase, size, tuple(self._pages(self._lengths[s] + n) for s, n in zip(seqs, lengths)),
               tuple(self._lengths[s] == 0 for s in seqs))
        func = self._token_fns[(phase, size)]

        def run():
            with self._on_stream():
                self._flush_aux(self.kv_cache)  # the aux copy, and the stream's wait for it: before any replay
            return self.graphs.run(key, lambda i: self._call_tokens(func, i), inp, len(seqs))

        return self._step(seqs, lengths, run)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int, *, stop_at_eos: bool = False) -> list[int]:
        """Greedy generation: the new token ids (prompt not included).

        Runs the device loop: each step's next id (argmax on the device) feeds the next step as
        a device tensor; the host only calls ``begin_forward`` and the step function, and copies
        the ids to the host once at the end. With ``stop_at_eos`` it copies them every
        :data:`EOS_CHECK_EVERY` steps to look for EOS (up to that many steps are computed past
        it and dropped). Libraries without token steps use the host-argmax loop.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        prompt = self._check_tokens(token_ids)
        if prompt.size == 0:
            raise EngineError("generate needs at least one prompt token")
        if prompt.size + max_new_tokens > self.config.context_window_size:
            raise ContextWindowError(
                f"{prompt.size} prompt tokens + {max_new_tokens} new tokens exceed the context window "
                f"of {self.config.context_window_size}"
            )
        if max_new_tokens == 0:
            return []
        seq = self.add_sequence()
        try:
            # The whole run's pages, checked up front: a full cache fails before the first step.
            self.check_capacity([seq], [prompt.size + max_new_tokens - 1])
            if not self.has_token_steps:
                return self._generate_on_host(seq, prompt, max_new_tokens, stop_at_eos)
            eos = self.config.eos_token_id
            history = IdHistory(self, max_new_tokens)
            ids = history.add(self.prefill_tokens(seq, prompt))
            for step in range(1, max_new_tokens):
                if stop_at_eos and step % EOS_CHECK_EVERY == 0 and eos in history.host(step - EOS_CHECK_EVERY, step):
                    break
                ids = history.add(self.decode_tokens([seq], ids))
            out = history.host(0, history.count).tolist()
            if stop_at_eos and eos in out:
                out = out[:out.index(eos) + 1]
            return out
        finally:
            self.remove_sequence(seq)

    def _generate_on_host(self, seq: int, prompt: np.ndarray, max_new_tokens: int, stop_at_eos: bool) -> list[int]:
        """The host-argmax loop (logits copied back every step)."""
        out: list[int] = []
        logits = self.prefill(seq, prompt)
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            if (stop_at_eos and token == self.config.eos_token_id) or step == max_new_tokens - 1:
                break
            logits = self.decode([seq], [token])[0]
        return out
