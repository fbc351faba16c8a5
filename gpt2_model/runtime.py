"""Run a compiled GPT-2: sequences in a paged KV cache, chunked prefill, batched decode, greedy
generation.

This module loads and runs a built library; building one is :mod:`tuning.engine`'s job
(``engine_from_hf``, ``engine_from_config``, ``build_engine``). Typical use::

    engine = Engine(exported=exported, executable=lib, params=params, device="cpu")
    seq = engine.add_sequence()
    logits = engine.prefill(seq, [464, 3290])          # (vocab,)
    logits = engine.decode([seq], [int(logits.argmax())])  # (1, vocab)
    engine.generate([464, 3290], max_new_tokens=8)      # greedy token ids
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import tvm
from tvm import relax

from .config import GPT2Config
from .device import tvm_device
from .export import ExportedModel
from .loader import expected_shapes
from .model import bucket_function
from .quantization import convert_params

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 16


class ContextWindowError(ValueError):
    """A sequence would grow past the model's context window."""


class EngineError(ValueError):
    """Bad input to the engine (unknown sequence, token id out of range, ...)."""


def random_params(exported: ExportedModel, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights in GPT-2's init style, converted to the stored form of the scheme."""
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


class Engine:  # pylint: disable=too-many-instance-attributes
    """A loaded library + weights + paged KV cache."""

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
    ):
        self.exported = exported
        self.config: GPT2Config = exported.config
        self.target = target
        self.device_name = device
        self.device = tvm_device(device)
        self.vm = relax.VirtualMachine(executable, self.device)
        self.params = self._upload(params)
        # A debug export threads IO effects (op.print_) through every compute function.
        self._effects = self.vm["_initialize_effect"]() if exported.metadata.get("debug") else None
        c = self.config
        self.max_batch_size = max_batch_size or c.max_batch_size
        self.max_total_seq_len = max_total_seq_len or c.context_window_size * min(self.max_batch_size, 8)
        shape = tvm.runtime.ShapeTuple  # int arguments of an nn.spec function travel as shapes
        self.kv_cache = self.vm["create_paged_kv_cache"](
            shape([self.max_batch_size]), shape([self.max_total_seq_len]),
            shape([c.prefill_chunk_size]), shape([page_size]), shape([0]),
        )
        self._f = {name: tvm.get_global_func(f"vm.builtin.kv_state_{name}") for name in
                   ("add_sequence", "remove_sequence", "begin_forward", "end_forward")}
        self._view = tvm.get_global_func("vm.builtin.reshape")
        # Static-shape entry points of tuned buckets: used when a step's shape equals the bucket.
        self.buckets = {phase: sorted(int(v) for v in values)
                        for phase, values in (exported.metadata.get("buckets") or {}).items()}
        self._bucket_fns = {(phase, v): self.vm[bucket_function(phase, v)]
                            for phase, values in self.buckets.items() for v in values}
        self._lengths: dict[int, int] = {}
        self._next_seq = 0

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
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise EngineError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids.astype(np.int32)

    def _check_room(self, seq: int, extra: int) -> None:
        window = self.config.context_window_size
        if self._lengths[seq] + extra > window:
            raise ContextWindowError(
                f"sequence {seq} would hold {self._lengths[seq] + extra} tokens, past the context window of {window}"
            )

    # ------------------------------------------------------------------ low-level steps
    def call(self, func, *args):
        """Call a compute function of the library (params appended, effects threaded if debug)."""
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

    # ------------------------------------------------------------------ user API
    def prefill(self, seq: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids`` to ``seq``; logits (vocab,) of the last position, fp32.

        Prompts longer than the prefill chunk are run in chunks.
        """
        self._check_seq(seq)
        ids = self._check_tokens(token_ids)
        if ids.size == 0:
            raise EngineError("prefill needs at least one token")
        self._check_room(seq, ids.size)
        chunk = self.config.prefill_chunk_size
        logits = None
        for start in range(0, ids.size, chunk):
            part = ids[start:start + chunk]
            embeds = self.view(self.embed(part), (1, part.size, self.config.n_embd))
            self.begin_forward([seq], [part.size])
            logits = self.run_prefill(embeds, part.size)
            self.end_forward()
            self._lengths[seq] += part.size
        return logits.numpy().reshape(-1)

    def decode(self, seqs: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One step for each sequence (different lengths allowed): logits (len(seqs), vocab)."""
        seqs = list(seqs)
        ids = self._check_tokens(tokens)
        if len(seqs) != ids.size or not seqs:
            raise EngineError(f"decode needs one token per sequence, got {len(seqs)} sequences and {ids.size} tokens")
        if len(set(seqs)) != len(seqs):
            raise EngineError("a sequence appears twice in one decode step")
        for seq in seqs:
            self._check_seq(seq)
            self._check_room(seq, 1)
        embeds = self.view(self.embed(ids), (len(seqs), 1, self.config.n_embd))
        self.begin_forward(seqs, [1] * len(seqs))
        logits = self.run_batch_decode(embeds, len(seqs))
        self.end_forward()
        for seq in seqs:
            self._lengths[seq] += 1
        return logits.numpy().reshape(len(seqs), -1)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int, *, stop_at_eos: bool = False) -> list[int]:
        """Greedy generation: the new token ids (prompt not included)."""
        prompt = self._check_tokens(token_ids)
        if prompt.size + max_new_tokens > self.config.context_window_size:
            raise ContextWindowError(
                f"{prompt.size} prompt tokens + {max_new_tokens} new tokens exceed the context window "
                f"of {self.config.context_window_size}"
            )
        seq = self.add_sequence()
        try:
            out: list[int] = []
            logits = self.prefill(seq, prompt)
            for step in range(max_new_tokens):
                token = int(np.argmax(logits))
                out.append(token)
                if (stop_at_eos and token == self.config.eos_token_id) or step == max_new_tokens - 1:
                    break
                logits = self.decode([seq], [token])[0]
            return out
        finally:
            self.remove_sequence(seq)
