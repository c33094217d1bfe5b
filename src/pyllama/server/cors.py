"""CORS as llama-server answers it (its ``--cors-*`` flags), on Starlette's ``CORSMiddleware``.

llama-server (``tools/server/server-http.cpp``) answers every ``OPTIONS``
request itself, before the API key check (a browser's preflight carries no
credentials): 200, an empty body, the allowed origin and the configured
``Access-Control-Allow-Credentials``, ``-Methods`` and ``-Headers``. Origins are
``*`` (the default; with credentials allowed the request's ``Origin`` is echoed),
``localhost`` (only loopback origins are echoed) or a comma-separated list.
Starlette's middleware sets the origin on every other response; its preflight
answer differs from llama-server's (400 for an origin it does not allow, the
requested headers echoed for ``*``), so that one method is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

# What llama-server's "localhost" origin value admits: a loopback host, any scheme and port.
LOOPBACK_ORIGIN = r"[A-Za-z][A-Za-z0-9+.-]*://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


@dataclass(frozen=True)
class CORSOptions:
    """llama-server's ``--cors-origins``, ``--cors-methods``, ``--cors-headers`` and ``--cors-credentials``
    (its defaults)."""

    origins: str = "*"
    methods: str = "GET, POST, DELETE, OPTIONS"
    headers: str = "*"
    credentials: bool = True


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class LlamaCORS(CORSMiddleware):
    """Starlette's CORS middleware with llama-server's answer to ``OPTIONS``."""

    def __init__(self, app: ASGIApp, options: CORSOptions) -> None:
        origins = _split(options.origins)
        regex = None
        if origins == ["localhost"]:
            origins, regex = [], LOOPBACK_ORIGIN
        super().__init__(app, allow_origins=origins, allow_origin_regex=regex, allow_methods=_split(options.methods),
                         allow_headers=_split(options.headers), allow_credentials=options.credentials)
        self.options = options

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            await self.preflight_response(Headers(scope=scope))(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        opts = self.options
        headers = {"Access-Control-Allow-Credentials": "true" if opts.credentials else "false",
                   "Access-Control-Allow-Methods": opts.methods, "Access-Control-Allow-Headers": opts.headers,
                   "Vary": "Origin"}
        origin = request_headers.get("origin")
        if origin is not None and self.is_allowed_origin(origin):
            headers["Access-Control-Allow-Origin"] = origin if self.preflight_explicit_allow_origin else "*"
        return Response(status_code=200, headers=headers)


__all__ = ["CORSOptions", "LlamaCORS", "LOOPBACK_ORIGIN"]
