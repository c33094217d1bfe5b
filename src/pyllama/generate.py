"""Generation: a stream of token events from a prompt, sync and async."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator, Union, cast

import numpy.typing as npt

from .decoder import Cursor, Decoder
from .errors import ClosedError, ContextOverflowError
from .options import GENERATE_KEYS, GenerateOptions, Unpack, check, stream_options
from .sampling import SamplerChain
from .speculative import SpeculativeStats, Speculator
from .stream import FinishReason, SequenceStream, StopMatcher, StreamResults, TokenEvent
from .vocab import as_tokens

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .context import Context
    from .media import Media, MediaPrompt

#: text, token ids, or text and media (a :class:`~pyllama.MediaPrompt`, or a list of strings and
#: :class:`~pyllama.Image` / :class:`~pyllama.Audio` tokenized with the model's projector)
TextPrompt = Union[str, bytes, npt.ArrayLike]
Prompt = Union[TextPrompt, "MediaPrompt", "Sequence[str | Media]"]


class Generation(StreamResults):
    """An iterator of :class:`TokenEvent` and a context manager; see :func:`generate`.

    After the stream ends, ``finish_reason`` says why, ``tokens`` holds the
    generated ids and ``text`` the emitted text. Iterating after close raises
    :class:`ClosedError`.
    """

    def __init__(self, ctx: Context, prompt: Prompt, **options: Unpack[GenerateOptions]) -> None:
        check("generate", options, GENERATE_KEYS)
        self.ctx = ctx
        model = ctx.model
        seq_id = options.get("seq_id", 0)
        n_keep = options.get("n_keep", 0)
        context_shift = options.get("context_shift", False)
        draft = options.get("draft")
        sampling = options.get("sampling", "auto")
        from .media import as_media_prompt, check_media_prompt

        media = as_media_prompt(model, prompt, add_special=options.get("add_special", True),
                                parse_special=options.get("parse_special", True))
        # a media prompt made here is ours to close
        self._own_media = media is not None and (media is not prompt or media.disposable)
        if media is not None:
            check_media_prompt(media, draft=draft is not None, context_shift=context_shift)
            prompt_tokens = media.tokens
        elif isinstance(prompt, (str, bytes)):
            prompt_tokens = model.vocab.tokenize(prompt, add_special=options.get("add_special", True),
                                                 parse_special=options.get("parse_special", True))
        else:
            prompt_tokens = as_tokens(cast("TextPrompt", prompt))
            model.vocab.check_tokens(prompt_tokens)
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
        self.media = media
        self._stream = SequenceStream(model, **stream_options(options))
        self._decoder = Decoder(ctx)
        if draft is None:
            self._decoder.prefer_backend(self._stream)
        self.max_tokens = self._stream.max_tokens
        self.seq_id = seq_id
        self.context_shift = context_shift
        self.n_keep = n_keep
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
            if self._spec.closed:
                self._stream.close()
                raise ClosedError("this speculator is closed")
            if self._spec.ctx is not ctx:
                self._stream.close()
                raise ValueError("this speculator drafts for another context")
            self._own_spec = not isinstance(draft, Speculator)
            self.speculative = SpeculativeStats()
        self._cursor = Cursor(seq_id, self._stream, prompt_tokens, limit=ctx.n_ctx_seq,
                              on_full="shift" if context_shift else "stop", n_keep=n_keep,
                              reuse_prefix=options.get("reuse_prefix", True), spec=self._spec,
                              stats=self.speculative, media=media)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._stream.finish_reason

    @property
    def n_prompt_evaluated(self) -> int:
        """Prompt tokens evaluated (not reused from what the sequence held)."""
        return self._cursor.n_evaluated

    @property
    def sampler(self) -> SamplerChain:
        """The sampler chain (for plain greedy decoding, built on first use: the loop needs none)."""
        return self._stream.chain

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._closed:
            raise ClosedError("this generation is closed")
        if self._iter is None:
            self._iter = self._decoder.generate(self._cursor, fused=self._stream.fusable,
                                                before_decode=self._before_decode)
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
        if self._own_media and self.media is not None:
            self.media.close()


def generate(ctx: Context, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Generation:
    """Stream a completion of ``prompt`` as :class:`TokenEvent` s.

    The options are :class:`pyllama.GenerateOptions`: ``sampler`` (a
    :class:`SamplerChain`, a list of sampler specs, or None for greedy; ``seed=``
    alone gives llama.cpp's default chain with that seed) or the plain knobs
    ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``,
    ``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``,
    ``logit_bias`` (llama.cpp's chain with its defaults), ``max_tokens`` (None:
    until end of generation or a full context), ``stop`` (strings, matched across
    tokens and never emitted), ``logprobs`` / ``top_logprobs``, ``grammar`` (GBNF)
    or ``json_schema`` (through llama.cpp's json-schema-to-grammar),
    ``ignore_eos``, ``seq_id``, ``context_shift`` (drop old tokens instead of
    stopping when the context is full, keeping the first ``n_keep``),
    ``reuse_prefix`` (evaluate only what the sequence does not already hold),
    ``draft`` (speculative decoding: a draft :class:`~pyllama.Model`,
    ``"ngram"`` for prompt lookup, or a :class:`~pyllama.Speculator` to reuse;
    statistics in ``gen.speculative``), ``sampling`` (where tokens are chosen:
    ``"auto"``, ``"host"``, ``"argmax"`` or ``"backend"``, in the compute
    graph). A misspelled option is a type error, and a TypeError naming the
    closest option at run time. Use as ``with generate(...) as gen: for ev in gen: ...``.
    """
    return Generation(ctx, prompt, **options)


def generate_text(ctx: Context, prompt: Prompt, **options: Unpack[GenerateOptions]) -> str:
    """The whole completion as one string."""
    with Generation(ctx, prompt, **options) as gen:
        for _ in gen:
            pass
        return gen.text


async def agenerate(ctx: Context, prompt: Prompt, *, max_delay: float = 0.001,
                    **options: Unpack[GenerateOptions]) -> AsyncIterator[TokenEvent]:
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
    from . import _producers
    from ._channel import EventChannel, Waiter, wake

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
