"""The front door every HTTP request passes: the API key check, the request counter, and the header names
written on the wire."""

from __future__ import annotations

import functools
import hmac

import anyio
from typing import TYPE_CHECKING, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response_for
from .protocol import APIError

if TYPE_CHECKING:
    from .state import ServerState

# The paths counted by name; anything else is counted as "other" (unbounded label values are not kept).
ENDPOINTS = ("/health", "/v1/health", "/metrics", "/v1/models", "/models", "/v1/chat/completions",
             "/chat/completions", "/v1/completions", "/completions", "/v1/embeddings", "/embeddings", "/tokenize",
             "/detokenize", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/responses",
             "/v1/responses/input_tokens", "/responses/input_tokens", "/completion", "/embedding", "/apply-template",
             "/props", "/slots", "/rerank", "/v1/rerank", "/reranking", "/v1/reranking", "/openapi.json", "/infill",
             "/lora-adapters", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/tags",
             "/api/show", "/api/ps", "/api/pull", "/api/delete", "/api/version")


# Answered without the API key: a load balancer's probe, and the API's description (it holds no secret).
PUBLIC = ("/health", "/v1/health", "/openapi.json")


class FrontDoor:
    """Pure ASGI middleware: the API key check and the request counter (also for streamed responses)."""

    def __init__(self, app: ASGIApp, server: ServerState) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        endpoint = "/v1/models" if path.startswith("/v1/models/") else (path if path in ENDPOINTS else "other")
        status = 500
        self.server.http_in_flight += 1  # (an unload waits for none: nothing then holds the model)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            limit = self.server.max_body_size
            length = _content_length(scope)
            if length is not None and length > limit:  # refused before a byte of it is read
                await error_response_for(path)(_too_large(limit))(scope, receive, send_status)
                return
            receive = _bounded(receive, limit, self.server.read_timeout)
            keys = self.server.api_keys
            if keys and path not in PUBLIC and not authorized(scope, keys):
                err = APIError(401, "invalid or missing API key (send Authorization: Bearer <key> or "
                               "x-api-key: <key>)", type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await error_response_for(path)(err)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.server.http_in_flight -= 1
            self.server.metrics.count_request(endpoint, status)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server takes ({limit} bytes; "
                    "pyllama serve --max-body-size)", code="request_too_large")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _bounded(receive: Receive, limit: int, timeout: float) -> Receive:
    """``receive`` that raises a 413 once the body (a chunked one has no length up front) passes ``limit``,
    and a 408 when a part of the body takes longer than ``timeout`` seconds to arrive (a client that trickles
    its body holds a connection and a task). Once the body is in, ``receive`` waits without a limit: it
    then only tells a disconnect."""
    seen = 0
    complete = False

    async def bounded() -> Message:
        nonlocal seen, complete
        if complete:
            return await receive()
        try:
            with anyio.fail_after(timeout):
                message = await receive()
        except TimeoutError:
            raise APIError(408, f"the request body stalled for more than {timeout:g} s (pyllama serve --timeout)",
                           code="request_timeout", headers={"Connection": "close"}) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
            complete = not message.get("more_body", False)
        return message
    return bounded


def authorized(scope: Scope, keys: Sequence[str]) -> bool:
    """Whether the request carries one of ``keys`` as ``Authorization: Bearer <key>`` or, as Anthropic's
    clients send it, ``x-api-key: <key>`` (compared in constant time; llama-server takes both)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            given = token.strip().encode()
            if scheme.lower() == "bearer" and any([hmac.compare_digest(given, k.encode()) for k in keys]):
                return True
        elif name == b"x-api-key":
            given = value.strip()
            if any([hmac.compare_digest(given, k.encode()) for k in keys]):
                return True
    return False


@functools.lru_cache(maxsize=256)
def _title_case(name: bytes) -> bytes:
    return b"-".join(part[:1].upper() + part[1:] for part in name.split(b"-"))


class WireHeaderNames:
    """Pure ASGI middleware, outermost: response header names go out in their usual capitalisation
    (``Content-Type``, ``Access-Control-Allow-Origin``), as llama-server (cpp-httplib) sends them.

    Header names are case-insensitive, but Starlette lowercases them and some clients do not: a
    ``dict(response.headers)`` from ``requests`` keeps the wire's spelling, and llama.cpp's own server tests
    look names up in such a dict."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_cased(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(_title_case(bytes(k)), v) for k, v in message.get("headers", ())]
            await send(message)

        await self.app(scope, receive, send_cased)
