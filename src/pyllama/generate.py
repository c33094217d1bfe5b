"""Generation: a stream of token events from a prompt, sync and async."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Literal, Sequence, Union

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from .batch import Batch
from .detokenize import StreamDecoder
from .errors import ClosedError, ContextOverflowError
from .sampling import DEFAULT_SEED, Sampler, SamplerChain, default_chain
from .vocab import as_tokens

if TYPE_CHECKING:
    from .context import Context

Prompt = Union[str, bytes, npt.ArrayLike]
SamplerArg = Union[SamplerChain, Sequence[Sampler], None]
FinishReason = Literal["eog", "length", "stop", "context"]


@dataclass(slots=True)
class TokenEvent:
    """One generated token: its id, the text it completes, and (on request) its log-probability.

    ``token`` is -1 for the final event that flushes text held back at the end.
    """

    token: int
    text: str
    index: int
    logprob: float | None = None


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
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
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


class Generation:
    """An iterator of :class:`TokenEvent` and a context manager; see :func:`generate`.

    After the stream ends, ``finish_reason`` says why, ``tokens`` holds the
    generated ids and ``text`` the emitted text. Iterating after close raises
    :class:`ClosedError`.
    """

    def __init__(self, ctx: Context, prompt: Prompt, *, sampler: SamplerArg = None, max_tokens: int | None = 256,
                 stop: Sequence[str] = (), seed: int | None = None, seq_id: int = 0, logprobs: bool = False,
                 add_special: bool = True, parse_special: bool = True, context_shift: bool = False,
                 n_keep: int = 0, reuse_prefix: bool = True) -> None:
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
        if max_tokens is not None and max_tokens < 0:
            raise ValueError("max_tokens must be >= 0 or None")
        self.prompt_tokens = prompt_tokens
        self._own_sampler = not isinstance(sampler, SamplerChain)
        if isinstance(sampler, SamplerChain):
            self.sampler = sampler
        else:
            specs = list(sampler) if sampler is not None else default_chain(
                temperature=0.0 if seed is None else 0.8, seed=DEFAULT_SEED if seed is None else seed)
            self.sampler = SamplerChain(specs, model)
        self.max_tokens = max_tokens
        self.seq_id = seq_id
        self.want_logprobs = logprobs
        self.context_shift = context_shift
        self.n_keep = n_keep
        self._reuse = reuse_prefix
        self._stop = StopMatcher(stop)
        self._decoder = StreamDecoder(model.vocab, lstrip_first=False)
        self._vocab_p = model.vocab._v()
        self._batch = Batch(1)
        self._scratch = np.empty(ctx.n_vocab, dtype=np.float32) if logprobs else None
        self._gen = np.empty(max_tokens if max_tokens is not None else 256, dtype=np.int32)
        self.n_generated = 0
        self.finish_reason: FinishReason | None = None
        self.text = ""
        self.n_prompt_evaluated = 0
        self._iter: Iterator[TokenEvent] | None = None
        self._closed = False

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        return self._gen[: self.n_generated]

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._closed:
            raise ClosedError("this generation is closed")
        if self._iter is None:
            self._iter = self._run()
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
        if self._own_sampler:
            self.sampler.close()

    def _logprob(self, token: int) -> float:
        logits = self.ctx.logits(-1)
        s = self._scratch
        assert s is not None
        mx = float(logits.max())
        np.subtract(logits, mx, out=s)
        np.exp(s, out=s)
        return float(logits[token]) - mx - float(np.log(s.sum(dtype=np.float64)))

    def _shift(self, pos: int) -> int:
        """Make room when the context is full: drop half of what follows the first n_keep tokens."""
        kv = self.ctx.kv
        n_discard = (pos - self.n_keep) // 2
        if not kv.can_shift or n_discard <= 0:
            raise ContextOverflowError("the context is full and its memory cannot shift")
        kv.remove(self.seq_id, self.n_keep, self.n_keep + n_discard)
        kv.shift(self.seq_id, self.n_keep + n_discard, -1, -n_discard)
        return pos - n_discard

    def _append(self, token: int) -> None:
        if self.n_generated == self._gen.size:
            self._gen = np.concatenate([self._gen, np.empty(self._gen.size, dtype=np.int32)])
        self._gen[self.n_generated] = token
        self.n_generated += 1

    def _run(self) -> Iterator[TokenEvent]:
        ctx = self.ctx
        prompt = self.prompt_tokens
        if prompt.size >= ctx.n_ctx_seq:  # context_shift: keep the start and the most recent tokens
            recent = ctx.n_ctx_seq // 2
            prompt = np.concatenate([prompt[: self.n_keep], prompt[-(recent - self.n_keep):]])
        self.n_prompt_evaluated = ctx.evaluate(prompt, seq_id=self.seq_id, reuse_prefix=self._reuse)
        pos = int(prompt.size)
        tracker = ctx._seq_tokens
        batch = self._batch
        tok_arr, pos_arr, logit_arr = batch.token, batch.pos, batch.logits
        batch.seq_id[0, 0] = self.seq_id
        logit_arr[0] = 1
        batch._struct.n_tokens = 1
        chain = self.sampler
        vocab_p = self._vocab_p
        max_tokens = self.max_tokens
        lock = ctx._lock
        token = chain.sample(ctx, -1)  # checked once: later rows are the ones we decode
        while max_tokens is None or self.n_generated < max_tokens:
            if self.n_generated:
                with lock:  # a close() from another thread cannot free the context mid-sample
                    ptr = ctx._ptr
                    if ptr is None:
                        raise ClosedError("the context was closed during generation")
                    token = chain._sample(ptr, -1)
            if lib.llama_vocab_is_eog(vocab_p, token):
                self.finish_reason = "eog"
                break
            self._append(token)
            logprob = self._logprob(token) if self.want_logprobs else None
            text, stopped = self._stop.feed(self._decoder.push(token))
            if text or logprob is not None:
                self.text += text
                yield TokenEvent(token, text, self.n_generated - 1, logprob)
            elif not stopped:
                yield TokenEvent(token, "", self.n_generated - 1, logprob)
            if stopped:
                self.finish_reason = "stop"
                return
            if max_tokens is not None and self.n_generated >= max_tokens:
                break
            if pos >= ctx.n_ctx_seq:
                if not self.context_shift:
                    self.finish_reason = "context"
                    break
                pos = self._shift(pos)
                tracker.forget(self.seq_id)
            tok_arr[0] = token
            pos_arr[0] = pos
            ctx._decode(batch)
            tracker.append(self.seq_id, token)
            pos += 1
        else:
            self.finish_reason = "length"
        if self.finish_reason is None:
            self.finish_reason = "length"
        tail = self._stop.flush() + self._decoder.flush()
        if tail:
            self.text += tail
            yield TokenEvent(-1, tail, self.n_generated, None)


def generate(ctx: Context, prompt: Prompt, **options: Any) -> Generation:
    """Stream a completion of ``prompt`` as :class:`TokenEvent` s.

    Options: ``sampler`` (a :class:`SamplerChain`, a list of sampler specs, or
    None for greedy; ``seed=`` alone gives llama.cpp's default chain with that
    seed), ``max_tokens`` (None: until end of generation or a full context),
    ``stop`` (strings, matched across tokens and never emitted), ``logprobs``,
    ``seq_id``, ``context_shift`` (drop old tokens instead of stopping when the
    context is full, keeping the first ``n_keep``), ``reuse_prefix`` (evaluate
    only what the sequence does not already hold). Use as ``with generate(...)
    as gen: for ev in gen: ...``.
    """
    return Generation(ctx, prompt, **options)


def generate_text(ctx: Context, prompt: Prompt, **options: Any) -> str:
    """The whole completion as one string."""
    with Generation(ctx, prompt, **options) as gen:
        for _ in gen:
            pass
        return gen.text


async def agenerate(ctx: Context, prompt: Prompt, **options: Any) -> AsyncIterator[TokenEvent]:
    """Async iterator of :class:`TokenEvent`; each step runs in a worker thread, so the
    event loop never blocks on llama.cpp."""
    gen = Generation(ctx, prompt, **options)
    it = iter(gen)
    done = object()
    try:
        while True:
            ev = await asyncio.to_thread(next, it, done)
            if ev is done:
                return
            yield ev  # type: ignore[misc]
    finally:
        gen.close()


__all__ = ["TokenEvent", "Generation", "StopMatcher", "generate", "generate_text", "agenerate"]
