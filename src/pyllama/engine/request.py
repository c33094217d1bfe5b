"""A request submitted to the engine, as its consumer sees it: a stream of token events."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator

import numpy as np
import numpy.typing as npt

from .._channel import END, EventChannel
from ..errors import LlamaError
from ..options import ContextFull
from ..speculative import SpeculativeStats
from ..stream import FinishReason, StreamResults, TokenEvent

if TYPE_CHECKING:
    from ..media import MediaPrompt
    from ..stream import SequenceStream


class EngineBusyError(LlamaError, RuntimeError):
    """The engine's queue is full; retry after ``retry_after`` seconds (HTTP 503)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_ids = itertools.count(1)

#: the ``token`` of a :class:`PromptProgress` event
PROGRESS_TOKEN = -2


@dataclass(slots=True)
class PromptProgress(TokenEvent):
    """How far the prompt's evaluation is (a request submitted with ``progress=True``): one event when the
    request gets its slot (``processed == cache``, the prefix reused from the cache), then one per prompt
    chunk decoded, the last with ``processed == total``; all before the first token. It carries no token
    (``token`` -2) and no text, so a consumer of tokens may pass it by; ``time_ms`` counts from the slot."""

    total: int = 0
    cache: int = 0
    processed: int = 0
    time_ms: float = 0.0

    @classmethod
    def of(cls, total: int, cache: int, processed: int, time_ms: float) -> PromptProgress:
        return cls(PROGRESS_TOKEN, "", -1, None, None, total, cache, processed, time_ms)

    def as_dict(self) -> dict[str, float]:
        """llama-server's ``prompt_progress``."""
        return {"total": self.total, "cache": self.cache, "processed": self.processed, "time_ms": self.time_ms}


class EngineRequest(StreamResults):
    """One generation in the engine: iterate it (``for`` or ``async for``) for :class:`TokenEvent` s.

    Leaving an ``async for`` early, the ``with`` block, or :meth:`cancel` frees
    its slot within one engine step. Afterwards ``finish_reason``,
    ``text``, ``tokens`` and the counters describe what happened; an error in
    the engine for this request is raised by the iterator.
    """

    def __init__(self, prompt_tokens: npt.NDArray[np.int32], stream: SequenceStream,
                 context_full: ContextFull, cancel: Callable[[EngineRequest], None]) -> None:
        self.id = f"req-{next(_ids)}"
        self.prompt_tokens = prompt_tokens
        self._stream = stream
        self.context_full = context_full
        self._channel: EventChannel[TokenEvent] = EventChannel()
        self._cancel_cb = cancel
        self._cancelled = False
        self._async_claimed = False
        self.n_prompt = int(prompt_tokens.size)
        self.n_cached = 0
        self.n_prefilled = 0  # prompt tokens decoded so far (besides the cached prefix)
        self.progress = False  # PromptProgress events wanted
        self.n_counted = 0  # generated tokens the engine's counters have seen
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None  # got a slot
        self.slot_id: int | None = None  # the slot serving it, once it got one
        self.slot_pin: int | None = None  # the slot it must run in (None: any)
        self.lora: tuple[float, ...] = ()  # the scale of each of the engine's LoRA adapters for it
        self.t_first_token: float | None = None
        self.t_done: float | None = None
        self.error: BaseException | None = None
        #: what the engine's drafter proposed and this request kept (None: no speculative decoding)
        self.speculative: SpeculativeStats | None = None
        self.media: MediaPrompt | None = None  # the prompt's images and audio
        self.own_media = False  # tokenized by the engine: closed with the request

    # --- results ---------------------------------------------------------------------
    @property
    def finish_reason(self) -> FinishReason | None:
        return self._stream.finish_reason if self.t_done is not None else None

    @property
    def done(self) -> bool:
        return self.t_done is not None

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first token (None before it)."""
        return None if self.t_first_token is None else self.t_first_token - self.t_submit

    # --- control ---------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this request; its slot is freed at the engine's next step. Idempotent."""
        if not self._cancelled and self.t_done is None:
            self._cancelled = True
            self._cancel_cb(self)

    # --- consumption -----------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        """The next event, blocking until the engine produces it."""
        ev = self._channel.get()
        if ev is END:
            raise StopIteration
        return ev

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._async_claimed:
            raise RuntimeError("an engine request can be async-iterated only once")
        self._async_claimed = True
        return self._async()

    async def _async(self) -> AsyncIterator[TokenEvent]:
        # Leaving an ``async for`` early (a client that went away) cancels the request.
        chan = self._channel
        try:
            while True:
                ev = await chan.aget()
                if ev is END:
                    return
                yield ev
        finally:
            if not chan.closed:
                self.cancel()

    def __enter__(self) -> EngineRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def result(self) -> str:
        """Consume the whole stream and return the text."""
        for _ in self:
            pass
        return self.text

    def __repr__(self) -> str:
        state = self.finish_reason or ("running" if self.t_start is not None else "queued")
        return f"<EngineRequest {self.id} {state} prompt={self.n_prompt} generated={self.n_generated}>"


__all__ = ["EngineRequest", "EngineBusyError", "PromptProgress"]
