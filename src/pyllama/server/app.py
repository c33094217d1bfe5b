"""The OpenAI-compatible ASGI application over a :class:`pyllama.engine.Engine`.

``create_app(engine)`` returns a Starlette app that can be served by uvicorn
(``pyllama serve``) or mounted inside any other ASGI app. It wires the routes
to the endpoint modules (:mod:`.info`, :mod:`.chat_completions`,
:mod:`.completions`, :mod:`.embeddings`, :mod:`.tokens`), which are functions
over one :class:`~.state.ServerState`; :mod:`.front_door` checks the API key
and counts requests, :mod:`.errors` gives every error OpenAI's shape.

Each endpoint validates the request, submits it to the engine (which raises at
once on a bad prompt, a full queue or bad parameters: a 4xx or 503 before any
byte is streamed) and consumes the engine request with ``async for``. A client
that goes away cancels its request, which frees the slot within one engine step.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import chat_completions, completions, embeddings, info, tokens
from .errors import api_error, exception_handlers
from .front_door import FrontDoor
from .state import EngineSource, ServerState

Endpoint = Callable[[ServerState, Request], Awaitable[Response]]


def create_app(engine: EngineSource, *, api_key: str | None = None, model_name: str | None = None,
               keepalive_s: float = 10.0, chat_template: str | None = None) -> Starlette:
    """The OpenAI-compatible app over ``engine``.

    ``engine`` is an :class:`~pyllama.engine.Engine` (the caller keeps owning
    it) or a callable that builds one: it is then called in a background
    thread at startup (``/health`` answers 503 ``{"status": "loading"}``
    meanwhile) and the app closes the engine and its model at shutdown.
    ``api_key`` makes every endpoint but ``/health`` require
    ``Authorization: Bearer <key>``; ``model_name`` is the id clients send
    (default: the model's file name); ``keepalive_s`` spaces the SSE comments
    sent while a stream waits for its first token; ``chat_template`` (Jinja
    source) replaces the model's own template. ``app.state.server``
    exposes ``on_load_error`` (callbacks run when the loader fails).
    """
    server = ServerState(engine, api_key=api_key, model_name=model_name, keepalive_s=keepalive_s,
                         chat_template=chat_template)

    def bound(handler: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        # A plain function (not a partial), so Starlette treats it as a request/response endpoint.
        async def endpoint(request: Request) -> Response:
            return await handler(server, request)
        return endpoint

    routes = [
        Route("/health", bound(info.health), methods=["GET"]),
        Route("/metrics", bound(info.metrics_endpoint), methods=["GET"]),
        Route("/v1/models", bound(info.models), methods=["GET"]),
        Route("/v1/models/{model:path}", bound(info.model), methods=["GET"]),
        Route("/v1/chat/completions", bound(chat_completions.chat_completions), methods=["POST"]),
        Route("/v1/completions", bound(completions.completions), methods=["POST"]),
        Route("/v1/embeddings", bound(embeddings.embeddings), methods=["POST"]),
        Route("/tokenize", bound(tokens.tokenize), methods=["POST"]),
        Route("/detokenize", bound(tokens.detokenize), methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(FrontDoor, server=server)],
                    exception_handlers=exception_handlers(), lifespan=server.lifespan)
    app.state.server = server
    return app


__all__ = ["create_app", "api_error"]
