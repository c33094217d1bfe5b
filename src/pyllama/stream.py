"""One sequence's generation state, shared by generate(), generate_parallel() and the serving engine.

A :class:`SequenceStream` owns what a generating sequence needs between
decodes: its sampler chain, incremental detokenizer, stop matcher, the tokens
it produced, its log-probabilities and why it finished. Whoever drives the
decodes (a single-sequence loop, a parallel batch, the engine's scheduler)
asks it to :meth:`~SequenceStream.sample` a batch row and to
:meth:`~SequenceStream.push` the token, and gets back the event to deliver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from .detokenize import StreamDecoder
from .errors import ClosedError
from .options import SAMPLING_MODES, SamplerArg, Sampling
from .samplers import DEFAULT_SEED, Grammar, Greedy, default_chain
from .sampling import SamplerChain

if TYPE_CHECKING:
    from .model import Model

FinishReason = Literal["eog", "length", "stop", "context", "cancelled"]

MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class TokenEvent:
    """One generated token: its id, the text it completes, and (on request) its log-probabilities.

    ``token`` is -1 for the final event that flushes text held back at the end.
    ``top_logprobs`` lists ``(token, logprob)`` pairs, most likely first.
    """

    token: int
    text: str
    index: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        # The stop string that completes first wins (ties: the one that starts first), as when
        # text arrives a character at a time: the result does not depend on how text is split.
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)[1]], True
        keep = 0
        for k in range(min(self._hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def build_chain(model: Model, sampler: SamplerArg, seed: int | None = None, *, grammar: str | None = None,
                json_schema: Mapping[str, Any] | str | None = None) -> tuple[SamplerChain, bool]:
    """The chain for ``sampler`` and whether the caller owns (must close) it.

    ``None`` means greedy, or llama.cpp's default chain when a ``seed`` is given.
    A ``grammar`` (GBNF) or ``json_schema`` (compiled to GBNF by llama.cpp's
    ``json-schema-to-grammar``) constrains the chain: it goes first.
    """
    if grammar is not None and json_schema is not None:
        raise ValueError("pass grammar or json_schema, not both")
    if isinstance(sampler, SamplerChain):
        if grammar is not None or json_schema is not None:
            raise ValueError("grammar/json_schema need sampler specs, not a built SamplerChain: "
                             "add pyllama.Grammar(...) to the chain yourself")
        return sampler, False
    if sampler is None:
        specs = default_chain(temperature=0.0 if seed is None else 0.8,
                              seed=DEFAULT_SEED if seed is None else seed)
    else:
        specs = list(sampler)
    if json_schema is not None:
        from .grammar import json_schema_to_grammar

        grammar = json_schema_to_grammar(json_schema)
    if grammar is not None:
        specs = [Grammar(grammar), *specs]
    return SamplerChain(specs, model), True


def _plain_greedy(sampler: SamplerArg, seed: int | None, grammar: str | None,
                  json_schema: Mapping[str, Any] | str | None) -> bool:
    """Whether :func:`build_chain` would build a plain greedy chain of its own."""
    if grammar is not None or json_schema is not None or isinstance(sampler, SamplerChain):
        return False
    if sampler is None:
        return seed is None
    return len(sampler) == 1 and sampler[0] == Greedy()


class StreamResults:
    """What a finished or running generation produced, read from its :class:`SequenceStream`
    (shared by :class:`pyllama.Generation` and the engine's requests)."""

    _stream: SequenceStream

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        return self._stream.tokens

    @property
    def n_generated(self) -> int:
        return self._stream.n_generated


class SequenceStream:
    """The per-sequence state of one generation (see the module docstring).

    ``max_tokens`` None means unbounded. With ``logprobs`` each event carries the
    sampled token's log-probability under the model's raw distribution, and
    ``top_logprobs`` (at most 20) the most likely alternatives.
    """

    __slots__ = ("model", "_chain", "own_chain", "max_tokens", "want_logprobs", "top_logprobs", "ignore_eos",
                 "_stop", "_decoder", "_vocab_p", "_scratch", "_gen", "n_generated", "finish_reason", "_parts",
                 "_argmax", "_greedy", "_eog_ids", "_n_vocab", "sampling", "_closed")

    def __init__(self, model: Model, sampler: SamplerArg = None, *, seed: int | None = None,
                 max_tokens: int | None = 256, stop: Sequence[str] = (), logprobs: bool = False,
                 top_logprobs: int = 0, ignore_eos: bool = False, grammar: str | None = None,
                 json_schema: Mapping[str, Any] | str | None = None, sampling: Sampling = "auto") -> None:
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, not {sampling!r}")
        if sampling == "backend" and (logprobs or top_logprobs or ignore_eos):
            raise ValueError("backend sampling leaves no host logits to read: it cannot give logprobs or "
                             "mask end-of-generation tokens (ignore_eos)")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError("max_tokens must be >= 0 or None")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must lie in [0, {MAX_TOP_LOGPROBS}]")
        if isinstance(stop, str):
            stop = [stop]
        self.model = model
        self._closed = False
        self._chain: SamplerChain | None
        if _plain_greedy(sampler, seed, grammar, json_schema):
            # built on first use (.chain): argmax and the fused step choose greedy tokens without it
            self._chain, self.own_chain, self._greedy = None, True, True
        else:
            self._chain, self.own_chain = build_chain(model, sampler, seed, grammar=grammar, json_schema=json_schema)
            # llama.cpp's greedy sampler builds a vocabulary-sized candidate array per
            # token; argmax over the logits view picks the same token (first maximum).
            self._greedy = self._chain.specs == (Greedy(),)
        if getattr(self._chain, "_backend_bound", False):
            # llama.cpp's chain, once initialised for the graph, asserts when it samples on the host
            raise ValueError("this SamplerChain was attached for backend sampling once and can only be used there:"
                             " pass sampler specs (a list) so that each generation builds its own chain")
        if sampling == "argmax" and not self._greedy:
            self.close()
            raise ValueError("sampling='argmax' is greedy decoding: the chain must be [Greedy()]")
        self.sampling = sampling
        self._argmax = not ignore_eos and self._greedy and sampling in ("auto", "argmax")
        self.max_tokens = max_tokens
        self.want_logprobs = logprobs or top_logprobs > 0
        self.top_logprobs = top_logprobs
        self.ignore_eos = ignore_eos
        self._eog_ids: npt.NDArray[np.intp] | None = None
        self._stop = StopMatcher(stop)
        self._decoder: StreamDecoder | None = None  # made by the first push (the fused step decodes in C)
        self._vocab_p = model.vocab._v()
        n_vocab = self._n_vocab = int(model.vocab.n_tokens)
        self._scratch = np.empty(n_vocab, dtype=np.float32) if (self.want_logprobs or ignore_eos) else None
        # grown by doubling past this: a large max_tokens (a server request's) never sizes an allocation
        self._gen = np.empty(min(max_tokens, 4096) if max_tokens is not None and max_tokens > 0 else 256,
                             dtype=np.int32)
        self.n_generated = 0
        self.finish_reason: FinishReason | None = None
        self._parts: list[str] = []  # the emitted text, joined on demand (no copy of it per token)

    @property
    def chain(self) -> SamplerChain:
        """The sampler chain (a plain greedy one is built here, on first use)."""
        chain = self._chain
        if chain is None:
            if self._closed:
                raise ClosedError("this generation is closed")
            chain = self._chain = SamplerChain([Greedy()], self.model)
        return chain

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        return self._gen[: self.n_generated]

    @property
    def text(self) -> str:
        """The text emitted so far."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def close(self) -> None:
        self._closed = True
        if self.own_chain and self._chain is not None:
            self._chain.close()

    # --- per token ---------------------------------------------------------------------
    def sample(self, ctx_ptr: Any, row: int) -> int:
        """Sample from the logits of batch ``row`` (which must have logits) and accept the token."""
        if self._argmax:
            logits = _logits(ctx_ptr, row, self._n_vocab)
            token = int(np.argmax(logits))
            if logits[token] == logits[token]:  # numpy picks a NaN; llama.cpp's rule never does
                return token
        if self.ignore_eos:
            if self._greedy and self.sampling != "host":
                return self._argmax_without_eog(ctx_ptr, row)
            return self._sample_without_eog(ctx_ptr, row)
        return self.chain._sample(ctx_ptr, row)

    def _argmax_without_eog(self, ctx_ptr: Any, row: int) -> int:
        # Greedy with end-of-generation tokens at -inf: argmax over the view, EOG logits set
        # aside for the call (the serving benchmark's case: greedy with ignore_eos).
        if self._eog_ids is None:
            self._eog_ids = self.model.vocab.eog_tokens()
        ptr = lib.llama_get_logits_ith(ctx_ptr, row)
        if ptr == ffi.NULL:
            raise IndexError(f"no logits for batch row {row}")
        arr = np.frombuffer(ffi.buffer(ptr, self._n_vocab * 4), dtype=np.float32)
        saved = arr[self._eog_ids].copy()
        arr[self._eog_ids] = -np.inf
        try:
            token = int(np.argmax(arr))
            if arr[token] == arr[token]:
                return token
        finally:
            arr[self._eog_ids] = saved
        return self._sample_without_eog(ctx_ptr, row)  # a NaN: llama.cpp's own rule

    def _sample_without_eog(self, ctx_ptr: Any, row: int) -> int:
        # Like llama-server's ignore_eos: end-of-generation tokens get -inf before sampling.
        if self._eog_ids is None:
            self._eog_ids = self.model.vocab.eog_tokens()
        ptr = lib.llama_get_logits_ith(ctx_ptr, row)
        n = self._n_vocab
        arr = np.frombuffer(ffi.buffer(ptr, n * 4), dtype=np.float32)
        saved = arr[self._eog_ids].copy()
        arr[self._eog_ids] = -np.inf
        try:
            return self.chain._sample(ctx_ptr, row)
        finally:
            arr[self._eog_ids] = saved

    def push(self, token: int, ctx_ptr: Any = None, row: int = -1) -> TokenEvent | None:
        """Account for a sampled ``token``; returns the event to deliver (None when nothing is).

        Sets :attr:`finish_reason` when the sequence ends: ``"eog"`` (the token is
        not emitted), ``"stop"`` (a stop string; the text before it is emitted) or
        ``"length"`` (``max_tokens`` reached). ``ctx_ptr``/``row`` locate the
        logits for log-probabilities.
        """
        if not self.ignore_eos and lib.llama_vocab_is_eog(self._vocab_p, token):
            self.finish_reason = "eog"
            return None
        dec = self._decoder
        if dec is None:  # a generation continues its prompt: no leading space is stripped
            dec = self._decoder = StreamDecoder(self.model.vocab, lstrip_first=False)
        return self.accept_text(token, dec.push(token), ctx_ptr, row)

    def prefer_backend(self) -> None:
        """Take "auto" to backend sampling when it can serve this stream: a plain greedy chain, no logprobs,
        no end-of-generation masking (called where :func:`~pyllama.backend_sampling.backend_sampling_pays`
        for the context)."""
        if self.sampling == "auto" and self._greedy and not self.want_logprobs and not self.ignore_eos:
            self.sampling = "backend"
            self._argmax = False

    @property
    def fusable(self) -> bool:
        """Whether the fused C step can sample for this stream (no Python sampler, no EOG masking)."""
        return not self.ignore_eos and (self._chain is None or not self._chain._has_custom)

    def accept_text(self, token: int, piece_text: str, ctx_ptr: Any = None, row: int = -1) -> TokenEvent | None:
        """:meth:`push` for a token known not to end generation whose text the caller decoded (the fused step)."""
        n = self.n_generated
        if n == self._gen.size:
            self._gen = np.concatenate([self._gen, np.empty(self._gen.size, dtype=np.int32)])
        self._gen[n] = token
        self.n_generated = n + 1
        logprob: float | None = None
        top: list[tuple[int, float]] | None = None
        if self.want_logprobs:
            logprob, top = self._logprobs(ctx_ptr, row, token)
        text, stopped = self._stop.feed(piece_text)
        if text:
            self._parts.append(text)
        if stopped:
            self.finish_reason = "stop"
        elif self.max_tokens is not None and self.n_generated >= self.max_tokens:
            self.finish_reason = "length"
        if text or logprob is not None or not stopped:
            return TokenEvent(token, text, n, logprob, top)
        return None

    def finish(self, reason: FinishReason | None = None, *, held: bytes = b"") -> TokenEvent | None:
        """End the stream (``reason`` unless one is set already); returns the flush of held-back text.

        ``held``: the start of a character that the caller's own detokenization (the fused step) held
        back at the end; it becomes U+FFFD, as the stream's incremental decoder would flush it.
        """
        if self.finish_reason is None:
            self.finish_reason = reason or "length"
        if self.finish_reason == "stop":
            return None  # text from the stop string on is never emitted
        tail = self._stop.flush()
        if self._decoder is not None:
            tail += self._decoder.flush()
        if held:
            tail += held.decode("utf-8", "replace")
        if tail:
            self._parts.append(tail)
            return TokenEvent(-1, tail, self.n_generated, None)
        return None

    def _logprobs(self, ctx_ptr: Any, row: int, token: int) -> tuple[float, list[tuple[int, float]] | None]:
        logits = _logits(ctx_ptr, row, self._n_vocab)
        s = self._scratch
        assert s is not None
        mx = float(logits.max())
        np.subtract(logits, mx, out=s)
        np.exp(s, out=s)
        lse = mx + float(np.log(s.sum(dtype=np.float64)))
        top: list[tuple[int, float]] | None = None
        if self.top_logprobs:
            k = self.top_logprobs
            idx = np.argpartition(logits, -k)[-k:]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            top = [(int(i), float(logits[i]) - lse) for i in idx]
        return float(logits[token]) - lse, top


def _logits(ctx_ptr: Any, row: int, n_vocab: int) -> npt.NDArray[np.float32]:
    ptr = lib.llama_get_logits_ith(ctx_ptr, row)
    if ptr == ffi.NULL:
        raise IndexError(f"no logits for batch row {row}")
    return np.frombuffer(ffi.buffer(ptr, n_vocab * 4), dtype=np.float32)


__all__ = ["TokenEvent", "StopMatcher", "SequenceStream", "StreamResults", "FinishReason", "SamplerArg", "build_chain",
           "MAX_TOP_LOGPROBS"]
