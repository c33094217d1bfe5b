"""A generation streamed from the worker: :class:`WorkerGeneration`, and the checks on its options."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import numpy.typing as npt

from ..errors import ClosedError
from ..generate import TokenEvent
from ..options import check
from ..samplers import Sampler
from ..sampling import SamplerChain
from ..speculative import SpeculativeStats
from . import protocol as p
from .errors import WorkerError
from .process import _Inbox, _Process

if TYPE_CHECKING:
    from .client import Worker


class WorkerGeneration:
    """A generation running in the worker: an iterator and an async iterator of
    :class:`pyllama.TokenEvent`, and a (sync or async) context manager.

    Tokens arrive as the child produces them. After the stream ends,
    ``finish_reason``, ``tokens``, ``text``, ``n_prompt_tokens``,
    ``n_prompt_evaluated`` and ``speculative`` are set as for :class:`pyllama.Generation`.
    ``close()`` (or leaving the ``with`` block, or dropping the object) stops
    the generation in the child. If the worker dies, iteration raises
    :class:`WorkerCrashedError`.
    """

    def __init__(self, worker: Worker, proc: _Process, rid: int, inbox: _Inbox,
                 on_end: Callable[[WorkerGeneration], None] | None = None) -> None:
        self._worker = worker  # keeps the worker (and its process) alive while the stream is
        self._proc = proc
        self._rid = rid
        self._inbox = inbox
        self._on_end = on_end
        self._tokens: list[int] = []
        self._texts: list[str] = []
        self.finish_reason: str | None = None
        self.n_prompt_tokens = 0
        self.n_prompt_evaluated = 0
        #: acceptance statistics of a speculative generation (``draft=``), once it has ended
        self.speculative: SpeculativeStats | None = None
        self._done = False
        self._closed = False
        self._cancel = weakref.finalize(self, proc.cancel_later, rid)

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        """The generated token ids so far."""
        return np.array(self._tokens, dtype=np.int32)

    @property
    def n_generated(self) -> int:
        return len(self._tokens)

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._texts)

    def _take(self, msg: tuple[Any, ...]) -> TokenEvent:
        kind = msg[0]
        if kind == p.TOKEN:
            _, _, token, text, index, logprob, top = msg
            if token >= 0:
                self._tokens.append(token)
            if text:
                self._texts.append(text)
            return TokenEvent(token, text, index, logprob, top)
        self._end()
        if kind == p.END:
            self.finish_reason, self.n_prompt_tokens, self.n_prompt_evaluated, self.speculative = msg[2:6]
            raise StopIteration
        if kind == p.ERR:
            raise self._proc.failure(p.decode_error(msg[2], WorkerError), self._inbox)
        raise msg[2]  # CRASH: WorkerCrashedError (or ClosedError when the worker was closed)

    def _end(self) -> None:
        self._finish(self._proc.done)

    def _finish(self, release: Callable[[int], None]) -> None:
        """Mark the stream done, let ``release`` forget (or cancel) the request, and run ``on_end`` once."""
        self._done = True
        self._cancel.detach()
        release(self._rid)
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)

    # --- sync ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        if self._closed:
            raise ClosedError("this generation is closed")
        return self

    def __next__(self) -> TokenEvent:
        if self._done or self._closed:
            raise StopIteration
        return self._take(self._inbox.get())

    def __enter__(self) -> WorkerGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the generation (in the child too). Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._finish(self._proc.cancel)  # CANCEL to the child; later tokens of this request are dropped

    # --- async ---------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._closed:
            raise ClosedError("this generation is closed")
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done or self._closed:
            raise StopAsyncIteration
        msg = await self._inbox.aget()
        try:
            return self._take(msg)
        except StopIteration:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> WorkerGeneration:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("done" if self._done else "running")
        return f"<pyllama.WorkerGeneration {state} tokens={len(self._tokens)} finish={self.finish_reason}>"


def portable_options(where: str, options: Mapping[str, Any], valid: frozenset[str]) -> dict[str, Any]:
    """``options`` checked (:func:`pyllama.options.check`) and made to cross to the child process: sampler
    specs as a list (a SamplerChain lives in this process), a JSON schema as a plain dict."""
    check(where, options, valid)
    out = dict(options)
    sampler = out.get("sampler")
    if isinstance(sampler, SamplerChain):
        raise TypeError("a SamplerChain lives in this process; pass the list of sampler specs "
                        "(e.g. [pyllama.TopK(40), pyllama.Dist(seed=1)]) and the worker builds the chain")
    if sampler is not None:
        if not all(isinstance(s, Sampler) for s in sampler):
            raise TypeError("sampler must be a list of pyllama sampler specs")
        out["sampler"] = list(sampler)
    max_tokens = out.get("max_tokens")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError("max_tokens must be >= 0 or None")
    stop = out.get("stop", ())
    if isinstance(stop, str):
        raise TypeError("stop must be a list of strings, not a string")
    if "stop" in out:
        out["stop"] = list(stop)
    schema = out.get("json_schema")
    if schema is not None and not isinstance(schema, str):
        out["json_schema"] = dict(schema)
    if "logit_bias" in out and out["logit_bias"] is not None:
        out["logit_bias"] = dict(out["logit_bias"])
    draft = out.get("draft")
    if draft is not None and not isinstance(draft, str):
        raise TypeError("a worker drafts with an n-gram drafter named by a string (a Model lives in this process)")
    return out


__all__ = ["WorkerGeneration"]
