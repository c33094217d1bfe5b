"""A one-producer, one-consumer channel from a llama.cpp thread to sync or async consumers.

The producer (a generation thread, the engine thread) never blocks and never
hops threads per item: :meth:`EventChannel.put` returns the parked async
consumer's waiter, if any, and the producer wakes all waiters of one step
with a single ``call_soon_threadsafe`` per event loop (:func:`wake`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Generic, Iterable, TypeVar

T = TypeVar("T")

END: Any = object()  # returned by get()/aget() once the channel is closed and drained

Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class EventChannel(Generic[T]):
    __slots__ = ("_items", "_lock", "_cond", "_done", "_error", "_waiter", "_blocked")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._done = False
        self._error: BaseException | None = None
        self._waiter: Waiter | None = None
        self._blocked = 0  # sync consumers in get(): notify only then (Condition.notify is Python code)

    # --- producer ------------------------------------------------------------------
    def put(self, item: T) -> Waiter | None:
        """Queue ``item``; returns the async waiter to wake (pass it to :func:`wake`)."""
        with self._lock:
            self._items.append(item)
            return self._wake_locked()

    def close(self, error: BaseException | None = None) -> Waiter | None:
        """End the stream (with ``error``, raised to the consumer after the queued items)."""
        with self._lock:
            if self._done:
                return None
            self._done = True
            self._error = error
            return self._wake_locked()

    def _wake_locked(self) -> Waiter | None:
        if self._blocked:
            self._cond.notify()
        w, self._waiter = self._waiter, None
        return w

    @property
    def closed(self) -> bool:
        return self._done

    # --- consumer ------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> T:
        """The next item (blocking), or :data:`END`; raises the producer's error at the end."""
        with self._lock:
            while not self._items and not self._done:
                self._blocked += 1
                try:
                    if not self._cond.wait(timeout):
                        raise TimeoutError("no event within the timeout")
                finally:
                    self._blocked -= 1
            return self._pop_locked()

    async def aget(self) -> T:
        """The next item without blocking the event loop, or :data:`END`."""
        while True:
            with self._lock:
                if self._items or self._done:
                    return self._pop_locked()
                fut = self._park_locked()
            await fut

    async def aget_all(self) -> list[T] | None:
        """Every queued item (at least one) without blocking the event loop, or None at the end
        (raising the producer's error then): one wake-up's events in one call."""
        while True:
            with self._lock:
                items = self._items
                if items:
                    out = list(items)
                    items.clear()
                    return out
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return None
                fut = self._park_locked()
            await fut

    def _park_locked(self) -> asyncio.Future[None]:
        """Register the running loop's consumer as the waiter the producer's next put wakes."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = (loop, fut)
        return fut

    def _pop_locked(self) -> T:
        if self._items:
            return self._items.popleft()
        if self._error is not None:
            raise self._error
        return END  # type: ignore[no-any-return]


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


def wake(waiters: Iterable[Waiter | None]) -> None:
    """Wake parked async consumers: one ``call_soon_threadsafe`` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for w in waiters:
        if w is not None:
            by_loop.setdefault(w[0], []).append(w[1])
    for loop, futs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futs)
        except RuntimeError:  # the loop was closed: nobody is waiting any more
            pass


__all__ = ["EventChannel", "END", "wake", "Waiter"]
