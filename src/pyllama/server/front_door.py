"""The front door every HTTP request passes: the API key check and the request counter."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from .protocol import APIError

if TYPE_CHECKING:
    from .state import ServerState

# The paths counted by name; anything else is counted as "other" (unbounded label values are not kept).
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
             "/tokenize", "/detokenize")


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

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            key = self.server.api_key
            if key is not None and path != "/health" and not authorized(scope, key):
                err = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(err)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.server.metrics.count_request(endpoint, status)


def authorized(scope: Scope, key: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <key>`` (compared in constant time)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False
