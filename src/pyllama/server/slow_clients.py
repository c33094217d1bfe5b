"""Time limits on slow clients, below the ASGI app: uvicorn's HTTP/1.1 protocol with a deadline on each
request's head.

uvicorn times out an idle keep-alive connection, but not one that is sending its request line and headers:
a client that opens connections and sends a header byte now and then (slowloris) holds each one forever.
:class:`HeadTimeoutH11Protocol` gives every request ``head_timeout`` seconds, from the connection or the
previous response, to deliver its complete head; past that the connection gets a 408 and is closed. The
body's pace is bounded in the app (:mod:`.front_door`: each chunk within the read timeout), where the
response can still say why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pyllama.server")

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: 32\r\n\r\nthe request head came too slowly")


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; a request whose head is not complete ``head_timeout`` seconds after the
    connection opened (or after the previous response) is answered 408 and its connection closed."""

    head_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # a head in progress (the idle keep-alive timer is off once bytes arrive)
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # idle until the next request: uvicorn's keep-alive timeout
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is under way (pipelining): its own completion re-arms
        log.info("closing a connection whose request head took more than %.0f s", self.head_timeout)
        self.transport.write(_TIMEOUT_408)
        self.transport.close()


def protocol_with(head_timeout: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class for uvicorn's ``http=``, with its deadline."""
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout": float(head_timeout)})


__all__ = ["HeadTimeoutH11Protocol", "protocol_with"]
