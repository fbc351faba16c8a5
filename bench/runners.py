"""TVM engine runners: one decode step / one prefill, as the benchmark times them.

A *decode step* is what a serving loop does per generated token: with a library that exports the
token-in/token-out entry points (``Engine.has_token_steps``), ``Engine.decode_tokens``: the
previous step's greedy ids (on the device) in, embed, layers, lm_head and argmax, the next ids out
on the device -- no host copy of ids or logits, as the gpt-fast-style peer does it. Older
libraries: upload the batch's token ids, embed them, ``begin_forward`` on the paged KV cache,
``batch_decode``, ``end_forward``, logits left on the device (``path`` says which).

A *prefill* appends ``seq_len`` tokens to each of ``batch`` empty sequences, in chunks of at
most ``prefill_chunk_size`` tokens, one sequence after the other, through
``Engine.prefill_tokens`` (embed .. last-position logits .. greedy id, as a serving loop's first
step; the static-shape bucket functions whenever a chunk has a bucket's length, as whole-step
CUDA graphs when the engine runs them). Older libraries: ``run_prefill``. Nothing is copied back.

With whole-step graphs (``Engine(cuda_graph=True)``) the engine works on its own CUDA stream;
the runners expose it as ``stream`` so the timer's events are recorded there.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TvmDecodeRunner", "TvmPrefillRunner", "engine_weight_bytes", "kv_bytes_per_token"]


def engine_weight_bytes(engine) -> int:
    """Bytes of weights one forward step reads from memory.

    Every parameter once (``lm_head`` is tied to ``wte``: one array), except ``wpe`` (position
    table) of which only the rows of the current positions are read. Stored sizes, so a
    quantized model counts its packed codes and scales.
    """
    total = 0
    for (name, _, _), arr in zip(engine.exported.param_specs(), engine.params):
        if name.endswith("wpe.weight"):
            continue
        shape = tuple(int(s) for s in arr.shape)
        total += int(np.prod(shape)) * np.dtype(str(arr.dtype)).itemsize
    return total


def kv_bytes_per_token(config, dtype: str) -> int:
    """KV-cache bytes of one cached token of one sequence (K and V of every layer)."""
    return 2 * config.n_layer * config.n_embd * np.dtype(dtype).itemsize


class _GraphAware:  # pylint: disable=too-few-public-methods
    """What the timer asks of a TVM runner whose engine may run whole-step CUDA graphs."""

    engine = None

    @property
    def stream(self) -> int | None:
        """The engine's CUDA stream when it runs whole-step graphs (the timer records there), else None."""
        return self.engine.graphs.stream if self.engine.graphs else None

    def replay_ms(self, n: int = 20, warmup: int = 3) -> float | None:
        """GPU ms of the last step's (prefill: chunk's) whole-step graph replayed alone ``n`` times
        (after ``warmup``), per replay, else None."""
        g = self.engine.graphs
        return g.replay_ms(n=n, warmup=warmup) if g is not None else None


class TvmDecodeRunner(_GraphAware):
    """Times batched decode steps of an :class:`gpt2_model.runtime.Engine`.

    Parameters
    ----------
    engine : Engine
    variant : str
        ``untuned`` or ``tuned`` (label only).
    seed : int
        Seed of the random prompt tokens.
    """

    def __init__(self, engine, *, variant: str, seed: int = 0):
        self.engine = engine
        self.variant = variant
        self.seed = seed
        self.weight_bytes = engine_weight_bytes(engine)
        self.kv_bytes_per_token = kv_bytes_per_token(engine.config, engine.exported.scheme.activation_dtype)
        self._seqs: list[int] = []
        self._ids = None
        self._dev_ids = None

    def start(self, *, batch: int, prompt_len: int, gen_len: int) -> None:
        """Add ``batch`` sequences and prefill ``prompt_len`` random tokens each (untimed)."""
        e = self.engine
        if prompt_len + gen_len > e.config.context_window_size:
            raise ValueError(f"prompt-len {prompt_len} + gen-len {gen_len} exceeds the context window "
                             f"{e.config.context_window_size}")
        rng = np.random.default_rng(self.seed)
        self._seqs = [e.add_sequence() for _ in range(batch)]
        for s in self._seqs:
            e.prefill(s, rng.integers(0, e.config.vocab_size, prompt_len))
        self._ids = rng.integers(0, e.config.vocab_size, batch).astype(np.int32)
        if self.path == "token-steps":
            import tvm

            self._dev_ids = tvm.runtime.tensor(self._ids, e.device)  # copied once; then fed from the device
        e.synchronize()

    @property
    def path(self) -> str:
        """``token-steps`` (device-resident ids, argmax on the device) or ``embed+decode`` (older libraries)."""
        return "token-steps" if self.engine.has_token_steps else "embed+decode"

    def step(self):
        """One decode step for every sequence; returns the next ids (token steps) or the logits, on the device."""
        e = self.engine
        if self.path == "token-steps":
            self._dev_ids = e.decode_tokens(self._seqs, self._dev_ids)
            return self._dev_ids
        b = len(self._seqs)
        embeds = e.view(e.embed(self._ids), (b, 1, e.config.n_embd))
        e.begin_forward(self._seqs, [1] * b)
        logits = e.run_batch_decode(embeds, b)
        e.end_forward()
        return logits

    def stop(self) -> None:
        """Remove the sequences (frees their KV pages)."""
        for s in self._seqs:
            self.engine.remove_sequence(s)
        self._seqs = []
        self._dev_ids = None


class TvmPrefillRunner(_GraphAware):
    """Times the prefill of ``batch`` fresh sequences of ``seq_len`` tokens."""

    def __init__(self, engine, *, variant: str, seed: int = 0):
        self.engine = engine
        self.variant = variant
        self.seed = seed
        self._seqs: list[int] = []
        self._ids: list[np.ndarray] = []

    def prepare(self, *, batch: int, seq_len: int) -> None:
        """Add the sequences and draw their tokens (untimed)."""
        e = self.engine
        if seq_len > e.config.context_window_size:
            raise ValueError(f"seq-len {seq_len} exceeds the context window {e.config.context_window_size}")
        rng = np.random.default_rng(self.seed)
        self._seqs = [e.add_sequence() for _ in range(batch)]
        self._ids = [rng.integers(0, e.config.vocab_size, seq_len).astype(np.int32) for _ in range(batch)]

    @property
    def path(self) -> str:
        """``token-steps`` (``Engine.prefill_tokens``: embed .. argmax, whole-step graphs in graph mode)
        or ``embed+prefill`` (older libraries)."""
        return "token-steps" if self.engine.has_token_steps else "embed+prefill"

    def run(self):
        """The timed prefill; returns the last position's logits tensor (on the device)."""
        e = self.engine
        if self.path == "token-steps":
            logits = None
            for seq, ids in zip(self._seqs, self._ids):
                _, logits = e.prefill_tokens(seq, ids, return_logits=True)
            return logits
        d = e.config.n_embd
        chunk = e.config.prefill_chunk_size
        logits = None
        for seq, ids in zip(self._seqs, self._ids):
            for start in range(0, ids.size, chunk):
                part = ids[start:start + chunk]
                embeds = e.view(e.embed(part), (1, part.size, d))
                e.begin_forward([seq], [part.size])
                logits = e.run_prefill(embeds, part.size)
                e.end_forward()
        return logits

    def cleanup(self) -> None:
        """Remove the sequences."""
        for s in self._seqs:
            self.engine.remove_sequence(s)
        self._seqs, self._ids = [], []
