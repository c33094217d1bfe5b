"""Generation: a stream of token events from a prompt, sync and async."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import numpy.typing as npt

from . import _producers
from ._channel import EventChannel, Waiter, wake
from ._ffi import ffi, lib
from .batch import Batch
from .errors import BusyError, ClosedError, ContextOverflowError, SamplerError
from . import speculative
from .sampling import SamplerChain, sampling_error
from .speculative import DraftArg, SpeculativeStats, Speculator
from .stream import FinishReason, SamplerArg, Sampling, SequenceStream, StopMatcher, StreamResults, TokenEvent
from .vocab import as_tokens

if TYPE_CHECKING:
    from .context import Context

Prompt = Union[str, bytes, npt.ArrayLike]


class Generation(StreamResults):
    """An iterator of :class:`TokenEvent` and a context manager; see :func:`generate`.

    After the stream ends, ``finish_reason`` says why, ``tokens`` holds the
    generated ids and ``text`` the emitted text. Iterating after close raises
    :class:`ClosedError`.
    """

    def __init__(self, ctx: Context, prompt: Prompt, *, sampler: SamplerArg = None, max_tokens: int | None = 256,
                 stop: Sequence[str] = (), seed: int | None = None, seq_id: int = 0, logprobs: bool = False,
                 top_logprobs: int = 0, add_special: bool = True, parse_special: bool = True,
                 context_shift: bool = False, n_keep: int = 0, reuse_prefix: bool = True,
                 ignore_eos: bool = False, grammar: str | None = None,
                 json_schema: Mapping[str, Any] | str | None = None, draft: DraftArg = None,
                 sampling: Sampling = "auto") -> None:
        self.ctx = ctx
        model = ctx.model
        if isinstance(prompt, (str, bytes)):
            prompt_tokens = model.vocab.tokenize(prompt, add_special=add_special, parse_special=parse_special)
        else:
            prompt_tokens = as_tokens(prompt)
        if prompt_tokens.size == 0:
            raise ValueError("empty prompt: nothing to condition the generation on")
        if prompt_tokens.size >= ctx.n_ctx_seq and not context_shift:
            raise ContextOverflowError(
                f"the prompt has {prompt_tokens.size} tokens; a sequence of this context holds {ctx.n_ctx_seq}")
        if not 0 <= seq_id < ctx.n_seq_max:
            raise ValueError(f"seq_id must lie in [0, {ctx.n_seq_max}) (the context's n_seq_max)")
        if not 0 <= n_keep < ctx.n_ctx_seq:
            raise ValueError(f"n_keep must lie in [0, {ctx.n_ctx_seq})")
        if draft is not None and context_shift:
            raise ValueError("speculative decoding (draft=) and context_shift cannot be combined")
        if draft is not None and sampling == "backend":
            raise ValueError("speculative decoding samples its draft rows on the host: use sampling='auto' or 'host'")
        self.prompt_tokens = prompt_tokens
        self._stream = SequenceStream(model, sampler, seed=seed, max_tokens=max_tokens, stop=stop,
                                      logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=ignore_eos,
                                      grammar=grammar, json_schema=json_schema, sampling=sampling)
        if draft is None and ctx._backend_sampling_pays:
            self._stream.prefer_backend()
        self.max_tokens = max_tokens
        self.seq_id = seq_id
        self.context_shift = context_shift
        self.n_keep = n_keep
        self._reuse = reuse_prefix
        self.n_prompt_evaluated = 0
        self._iter: Iterator[TokenEvent] | None = None
        self._closed = False
        # called right before each token's decode (agenerate: wake the consumer then, see there)
        self._before_decode: Callable[[], None] | None = None
        # speculative decoding: a speculator passed in is the caller's; one built from a model or name is ours
        self._spec: Speculator | None = None
        self._own_spec = False
        self.speculative: SpeculativeStats | None = None
        if draft is not None:
            try:
                self._spec = draft if isinstance(draft, Speculator) else Speculator(ctx, draft)
            except BaseException:
                self._stream.close()
                raise
            self._own_spec = not isinstance(draft, Speculator)
            self.speculative = SpeculativeStats()

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._stream.finish_reason

    @property
    def sampler(self) -> SamplerChain:
        """The sampler chain (for plain greedy decoding, built on first use: the loop needs none)."""
        return self._stream.chain

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._closed:
            raise ClosedError("this generation is closed")
        if self._iter is None:
            self._iter = self._fused() if self._spec is None and self._stream.fusable else self._run()
        return self._iter

    def __next__(self) -> TokenEvent:
        return next(iter(self))

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop generating and release the sampler chain it created."""
        if self._closed:
            return
        self._closed = True
        if self._iter is not None:
            self._iter.close()  # type: ignore[attr-defined]
        self._stream.close()
        if self._own_spec and self._spec is not None:
            self._spec.close()

    def _shift(self, pos: int) -> int:
        """Make room when the context is full: drop half of what follows the first n_keep tokens."""
        kv = self.ctx.kv
        n_discard = (pos - self.n_keep) // 2
        if not kv.can_shift or n_discard <= 0:
            raise ContextOverflowError("the context is full and its memory cannot shift")
        kv.remove(self.seq_id, self.n_keep, self.n_keep + n_discard)
        kv.shift(self.seq_id, self.n_keep + n_discard, -1, -n_discard)
        return pos - n_discard

    def _start(self, ctx: Context) -> tuple[Callable[[], None], npt.NDArray[np.int32]]:
        """Claim ``ctx`` for this thread, attach the chain for backend sampling (or detach an earlier,
        unfinished generation's) and evaluate the prompt; returns the claim's release and the prompt
        evaluated. The stream is finished already when there is nothing to generate."""
        release = _claim(ctx)
        stream = self._stream
        try:
            ctx._attach_sampler(self.seq_id, stream.chain if stream.sampling == "backend" else None)
            prompt = self.prompt_tokens
            if prompt.size >= ctx.n_ctx_seq:  # context_shift: keep the start and the most recent tokens
                recent = ctx.n_ctx_seq // 2
                prompt = np.concatenate([prompt[: self.n_keep], prompt[-(recent - self.n_keep):]])
            # the whole prompt in one batch (n_batch allowing), as llama.cpp's tools decode it: a split changes
            # the logits in their last digits, and near ties decide tokens
            self.n_prompt_evaluated = ctx.evaluate(prompt, seq_id=self.seq_id, reuse_prefix=self._reuse)
        except BaseException:
            self._end(ctx, release)
            raise
        if stream.max_tokens == 0:
            stream.finish("length")
        return release, prompt

    def _end(self, ctx: Context, release: Callable[[], None]) -> None:
        try:
            if self._stream.sampling == "backend":
                ctx._detach_sampler(self.seq_id, self._stream._chain)
        finally:
            release()

    def _run(self) -> Iterator[TokenEvent]:
        """The token loop with a sampling call from Python per token (custom samplers, end-of-generation
        masking), or speculative decoding."""
        ctx = self.ctx
        release, prompt = self._start(ctx)
        try:
            stream = self._stream
            if stream.finish_reason is not None:
                return
            if self._spec is not None:
                yield from self._speculative(ctx, prompt)
                return
            pos = int(prompt.size)
            tracker = ctx._seq_tokens
            batch = self._one_token_batch()
            tok_arr, pos_arr = batch.token, batch.pos
            push, sample = stream.push, stream.sample
            lock = ctx._lock
            while True:
                with lock:  # a close() from another thread cannot free the context mid-sample
                    ptr = ctx._ptr
                    if ptr is None:
                        raise ClosedError("the context was closed during generation")
                    token = sample(ptr, -1)
                    ev = push(token, ptr, -1)
                if ev is not None:
                    yield ev
                if stream.finish_reason is not None:
                    break
                if pos >= ctx.n_ctx_seq:
                    if not self.context_shift:
                        stream.finish("context")
                        break
                    pos = self._shift(pos)
                    tracker.forget(self.seq_id)
                tok_arr[0] = token
                pos_arr[0] = pos
                if self._before_decode is not None:
                    self._before_decode()
                ctx._decode(batch)
                tracker.append(self.seq_id, token)
                pos += 1
            tail = stream.finish()
            if tail is not None:
                yield tail
        finally:
            self._end(ctx, release)

    def _speculative(self, ctx: Context, prompt: npt.NDArray[np.int32]) -> Iterator[TokenEvent]:
        """The first token from the prompt's logits, then drafted-and-verified rounds (pyllama.speculative)."""
        stream = self._stream
        assert self._spec is not None and self.speculative is not None
        with ctx._lock:
            ptr = ctx._ptr
            if ptr is None:
                raise ClosedError("the context was closed during generation")
            token = stream.sample(ptr, -1)
            ev = stream.push(token, ptr, -1)
        if ev is not None:
            yield ev
        if stream.finish_reason is None:
            yield from speculative.run(self._spec, ctx, stream, self.seq_id, prompt, token, self.speculative,
                                       self._before_decode)
        tail = stream.finish()
        if tail is not None:
            yield tail

    def _fused(self) -> Iterator[TokenEvent]:
        """The token loop with one C call per token (pyllama_step_next: decode, sample, EOG check, piece).

        The first step samples from the prompt's logits; each later one first decodes the token before.
        Without stop strings or log-probabilities the event is made right here (the common case, a few
        local operations per token); the context's record of what the sequence holds asks for the
        decoded tokens when it is used (SeqTokens.follow). One generator from the claim to the release:
        each level of ``yield from`` would cost every token a frame switch.
        """
        ctx = self.ctx
        release, prompt = self._start(ctx)
        stream = self._stream
        tracker = ctx._seq_tokens
        seq_id = self.seq_id
        try:
            if stream.finish_reason is not None:
                return
            pos = int(prompt.size)
            s = ffi.new("pyllama_step *")
            # the abort state is re-armed in C before each decode (check_signals: this thread's); a
            # generation continues its prompt, so no piece loses a leading space (lstrip 0)
            lib.pyllama_step_init(s, ffi.NULL if stream._argmax else stream.chain._p(), stream._vocab_p,
                                  ctx._arm_abort(), pos, ctx.n_ctx_seq, seq_id, stream._argmax, ctx.n_vocab, 0)
            step, unpack, piece = lib.pyllama_step_next, ffi.unpack, s.piece
            fast = not stream.want_logprobs and not stream._stop.stops
            limit = stream.max_tokens if stream.max_tokens is not None else -1
            parts_append = stream._parts.append
            lock = ctx._lock
            acquire, release_lock = lock.acquire, lock.release
            before = self._before_decode
            n = stream.n_generated
            out = stream._gen
            cap = out.size
            recorded = pos  # tokens decoded before this position are in the tracker

            def pending() -> tuple[int, npt.NDArray[np.int32]]:
                nonlocal recorded
                start, end = recorded, int(s.pos)
                if end <= start:
                    return start, _NO_TOKENS
                recorded = end
                return start, stream._gen[start - pos: end - pos]

            tracker.follow(seq_id, pending)
            while True:
                if before is not None:
                    before()
                acquire()  # a close() from another thread cannot free the context mid-step
                try:  # (acquire/release: half the cost of a with block per token)
                    ptr = ctx._ptr
                    if ptr is None:
                        raise ClosedError("the context was closed during generation")
                    tok = step(ptr, s)
                finally:
                    release_lock()
                if tok < 0:
                    if self._step_ends(ctx, s, tok):
                        break
                    continue
                k = s.n_piece  # whole characters only: the step holds back the start of an incomplete one
                text = unpack(piece, k).decode("utf-8", "replace") if k >= 0 else _long_piece_text(stream, s, tok)
                if not fast:
                    with lock:
                        ev = stream.accept_text(tok, text, ctx._p(), -1)
                    if ev is not None:
                        yield ev
                    if stream.finish_reason is not None:
                        break
                    continue
                if n == cap:
                    out = stream._gen = np.concatenate([out, np.empty(cap, dtype=np.int32)])
                    cap = out.size
                out[n] = tok
                n += 1
                stream.n_generated = n
                if text:
                    parts_append(text)
                if n == limit:
                    stream.finish_reason = "length"
                    yield TokenEvent(tok, text, n - 1)
                    break
                yield TokenEvent(tok, text, n - 1)
            # an incomplete character held back at the end becomes U+FFFD
            tail = stream.finish(held=unpack(s.pending, s.n_pending) if s.n_pending else b"")
            if tail is not None:
                yield tail
        finally:
            tracker.unfollow(seq_id)
            self._end(ctx, release)

    def _step_ends(self, ctx: Context, s: Any, code: int) -> bool:
        """After a step that chose no token to emit: raise for a failure, finish at end of generation or a
        full context (True), or make room in the context (False: go on)."""
        if code == lib.PYLLAMA_STEP_FAILED:
            with ctx._lock:
                ctx._p()  # closed meanwhile: ClosedError
                self._step_failed(ctx, s)
        stream = self._stream
        if code == lib.PYLLAMA_STEP_EOG:
            stream.finish_reason = "eog"
            return True
        if not self.context_shift:  # PYLLAMA_STEP_FULL
            stream.finish("context")
            return True
        tracker = ctx._seq_tokens
        tracker.unfollow(self.seq_id)
        s.pos = self._shift(s.pos)
        tracker.forget(self.seq_id)
        return False

    def _step_failed(self, ctx: Context, s: Any) -> None:
        """Raise for a failed pyllama_step_next (under the context's lock)."""
        if s.rc == lib.PYLLAMA_STEP_SAMPLER_ERROR:
            raise SamplerError(f"sampling failed: {sampling_error()}")
        batch = self._one_token_batch()
        batch.token[0] = s.prev
        batch.pos[0] = s.pos
        ctx._decode_failed(batch, s.rc)

    def _one_token_batch(self) -> Batch:
        return Batch(1).add([0], 0, self.seq_id, logits="all")


def _long_piece_text(stream: SequenceStream, s: Any, token: int) -> str:
    """The text of a piece longer than pyllama_step_next's buffer (never in practice), held-back bytes
    handled as the step handles them."""
    piece = stream.model.vocab._piece(token, False, s.lstrip, ffi.new("char[]", 256))
    s.lstrip = 0
    data: bytes = ffi.unpack(s.pending, s.n_pending) + piece
    whole = int(lib.pyllama_utf8_complete(data, len(data)))
    s.n_pending = len(data) - whole
    ffi.memmove(s.pending, data[whole:], len(data) - whole)
    return data[:whole].decode("utf-8", "replace")


def _claim(ctx: Context) -> Any:
    """Mark ``ctx`` as generating in this thread; another thread's generation raises BusyError.

    A context's logits belong to its last decode, so two threads generating on one
    context would sample each other's rows. Several generations interleaved in one
    thread (different sequences) are fine: each samples right after its own decode.
    """
    me = threading.get_ident()
    with _CLAIM_LOCK:
        owner = ctx._gen_owner
        if owner is not None and owner[0] != me:
            raise BusyError("this context is generating in another thread: a context serves one generation "
                            "at a time (use one context per thread, pyllama.generate_parallel, or the engine)")
        ctx._gen_owner = (me, 1 if owner is None else owner[1] + 1)

    def release() -> None:
        with _CLAIM_LOCK:
            owner = ctx._gen_owner
            if owner is not None:
                ctx._gen_owner = None if owner[1] <= 1 else (owner[0], owner[1] - 1)

    return release


_CLAIM_LOCK = threading.Lock()
_NO_TOKENS = np.empty(0, dtype=np.int32)


def generate(ctx: Context, prompt: Prompt, **options: Any) -> Generation:
    """Stream a completion of ``prompt`` as :class:`TokenEvent` s.

    Options: ``sampler`` (a :class:`SamplerChain`, a list of sampler specs, or
    None for greedy; ``seed=`` alone gives llama.cpp's default chain with that
    seed), ``max_tokens`` (None: until end of generation or a full context),
    ``stop`` (strings, matched across tokens and never emitted), ``logprobs`` /
    ``top_logprobs`` (log-probabilities on each event), ``grammar`` (GBNF) or
    ``json_schema`` (output constrained to the schema, through llama.cpp's
    json-schema-to-grammar), ``ignore_eos``, ``seq_id``, ``context_shift`` (drop old tokens instead of stopping when the
    context is full, keeping the first ``n_keep``), ``reuse_prefix`` (evaluate
    only what the sequence does not already hold), ``draft`` (speculative
    decoding: a draft :class:`~pyllama.Model`, ``"ngram"`` for prompt lookup, or
    a :class:`~pyllama.Speculator` to reuse; statistics in ``gen.speculative``),
    ``sampling`` (where tokens are chosen: ``"auto"``, ``"host"``,
    ``"argmax"`` or ``"backend"``: in the compute graph, llama.cpp's
    experimental backend sampling; see :data:`pyllama.stream.Sampling`). Use as ``with generate(...)
    as gen: for ev in gen: ...``.
    """
    return Generation(ctx, prompt, **options)


def generate_text(ctx: Context, prompt: Prompt, **options: Any) -> str:
    """The whole completion as one string."""
    with Generation(ctx, prompt, **options) as gen:
        for _ in gen:
            pass
        return gen.text


async def agenerate(ctx: Context, prompt: Prompt, *, max_delay: float = 0.001,
                    **options: Any) -> AsyncIterator[TokenEvent]:
    """Async iterator of :class:`TokenEvent` (options as :func:`generate`).

    A producer thread (kept for the next generation) runs it; events reach the event loop
    through a channel that wakes it only when the consumer is waiting, and
    only as the next decode starts (the loop runs while llama.cpp does, not
    while the producer needs the GIL), so the loop never blocks on llama.cpp.
    Waking an event loop costs tens of microseconds of its thread's time, so
    when tokens come faster than one per ``max_delay`` seconds (default 1 ms)
    the events of that span are delivered together: each reaches the
    consumer at most one token's time after it would have (0: wake per token).
    Leaving the iteration early stops the generation after the current token.
    """
    if max_delay < 0:
        raise ValueError("max_delay must be >= 0 seconds")
    gen = Generation(ctx, prompt, **options)
    chan: EventChannel[TokenEvent] = EventChannel()
    stopping: list[bool] = []  # appended to when the consumer leaves (a list: read per token without a call)
    held: list[Waiter] = []
    last_wake = 0.0
    clock = time.monotonic

    def deliver() -> None:
        # Wake the consumer only as the next decode starts: its event loop then takes the GIL
        # while llama.cpp runs without it, instead of holding it while this thread needs it.
        nonlocal last_wake
        if held:
            now = clock()
            if now - last_wake >= max_delay:
                last_wake = now
                wake(held)
                held.clear()

    gen._before_decode = deliver

    def produce() -> None:
        error: BaseException | None = None
        put = chan.put
        try:
            for ev in gen:
                waiter = put(ev)
                if waiter is not None:
                    held.append(waiter)
                if stopping:
                    break
        except BaseException as exc:  # delivered to the consumer
            error = exc
        finally:
            gen.close()
            waiter = chan.close(error)
            if waiter is not None:
                held.append(waiter)
            wake(held)
            held.clear()

    done = _producers.submit(produce)
    try:
        while True:
            events = await chan.aget_all()
            if events is None:
                return
            for ev in events:
                yield ev
    finally:
        stopping.append(True)
        # At most one token's decode: afterwards the context is free for the caller again.
        done.wait()


__all__ = ["TokenEvent", "Generation", "StopMatcher", "generate", "generate_text", "agenerate"]
