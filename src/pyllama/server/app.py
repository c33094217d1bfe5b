"""The OpenAI-compatible ASGI application over a :class:`pyllama.engine.Engine`.

``create_app(engine)`` returns a Starlette app that can be served by uvicorn
(``pyllama serve``) or mounted inside any other ASGI app. It wires the routes
to the endpoint modules (:mod:`.info`, :mod:`.chat_completions`,
:mod:`.completions`, :mod:`.embeddings`, :mod:`.tokens`; llama-server's own:
:mod:`.native` for ``/completion``, :mod:`.props` for ``/props`` and ``/slots``), which are functions
over one :class:`~.state.ServerState`; :mod:`.front_door` checks the API key
and counts requests, :mod:`.cors` answers browsers as llama-server does,
:mod:`.errors` gives every error OpenAI's shape (Anthropic's on its routes):
:mod:`.anthropic` and :mod:`.openai_responses` translate Anthropic's Messages
and OpenAI's Responses onto the chat path. The paths are llama-server's, with
and without ``/v1`` where it has both.

Each endpoint validates the request, submits it to the engine (which raises at
once on a bad prompt, a full queue or bad parameters: a 4xx or 503 before any
byte is streamed) and consumes the engine request with ``async for``. A client
that goes away cancels its request, which frees the slot within one engine step.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Literal, Mapping, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..chat import ReasoningFormat
from . import chat_completions, completions, embeddings, info, native, rerank, tokens
from . import props as props_routes  # (``props`` is create_app's switch)
from . import anthropic, openai_responses
from .cors import CORSOptions, LlamaCORS
from .errors import api_error, exception_handlers
from .front_door import FrontDoor, WireHeaderNames
from .params import RequestDefaults
from .state import EngineSource, ServerState

Endpoint = Callable[[ServerState, Request], Awaitable[Response]]


def create_app(engine: EngineSource, *, api_key: str | Sequence[str] | None = None, model_name: str | None = None,
               keepalive_s: float = 10.0, chat_template: str | None = None, aliases: Sequence[str] = (),
               defaults: RequestDefaults | None = None, metrics: bool = True,
               cors: CORSOptions | None = None, reasoning_format: ReasoningFormat = "auto", slots: bool = True,
               props: bool = False, reasoning: Literal["on", "off", "auto"] = "auto",
               chat_template_kwargs: Mapping[str, Any] | None = None, verbose: bool = False,
               tags: Sequence[str] = (), jinja: bool = True, max_body_size: int | None = None,
               read_timeout: float = 600.0) -> Starlette:
    """The OpenAI-compatible app over ``engine``.

    ``engine`` is an :class:`~pyllama.engine.Engine` (the caller keeps owning
    it) or a callable that builds one: it is then called in a background
    thread at startup (``/health`` answers 503 ``{"status": "loading"}``
    meanwhile) and the app closes the engine and its model at shutdown.
    ``api_key`` (one key or several) makes every endpoint but ``/health``
    require ``Authorization: Bearer <key>``; ``model_name`` is the id
    ``/v1/models`` reports (default: the model's file name), ``aliases`` more
    names it lists (``tags``: labels it shows); requests may name any model (there is one). ``keepalive_s``
    spaces the SSE comments sent while a stream waits for its first token;
    ``chat_template`` (Jinja source) replaces the model's own template and
    ``reasoning_format`` says where thinking goes (llama-server's
    ``--reasoning-format``), ``reasoning="off"`` renders chats with thinking
    turned off (its ``--reasoning``; "auto": on where the template thinks) and
    ``chat_template_kwargs`` are template variables for every chat (its
    ``--chat-template-kwargs``; a request's own are added). ``verbose`` adds
    llama-server's debugging field ``__verbose`` (the native answer, with the
    rendered prompt) to chat completions that do not ask otherwise (its ``-v``).
    ``jinja=False`` renders chats with llama.cpp's legacy renderer alone (its
    ``--no-jinja``: no tools; a JSON schema is a plain grammar). ``defaults`` are what requests that leave a
    sampling parameter or ``max_tokens`` unset get. ``metrics=False`` answers
    ``/metrics`` with 501, as llama-server without ``--metrics``; ``cors``
    configures CORS as llama-server's ``--cors-*`` flags (default: none; an
    app mounted in another leaves CORS to it). ``slots=False`` answers ``GET /slots``
    with 501 (llama-server's ``--no-slots``), ``props=True`` lets ``POST /props``
    answer (its ``--props``). ``max_body_size`` bounds a request's body in bytes (413 past it, refused
    before reading when the length is declared; default: a whole slot's context as JSON, at least
    16 MiB); ``read_timeout`` bounds the wait for each part of a request's body (408 past it; llama-server's
    ``--timeout``, 600 s). ``app.state.server`` exposes
    ``on_load_error`` (callbacks run when the loader fails).
    """
    server = ServerState(engine, api_key=api_key, model_name=model_name, keepalive_s=keepalive_s,
                         chat_template=chat_template, aliases=aliases, defaults=defaults or RequestDefaults(),
                         metrics=metrics, reasoning_format=reasoning_format, slots=slots, props=props,
                         thinking=reasoning != "off", chat_template_kwargs=chat_template_kwargs,
                         verbose=verbose, tags=tags, jinja=jinja, max_body_size=max_body_size,
                         read_timeout=read_timeout)

    def bound(handler: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        # A plain function (not a partial), so Starlette treats it as a request/response endpoint.
        async def endpoint(request: Request) -> Response:
            return await handler(server, request)
        return endpoint

    def routes(paths: Sequence[str], handler: Endpoint, method: str) -> list[Route]:
        endpoint = bound(handler)
        return [Route(path, endpoint, methods=[method]) for path in paths]

    table = [
        *routes(("/health", "/v1/health"), info.health, "GET"),
        *routes(("/metrics",), info.metrics_endpoint, "GET"),
        *routes(("/v1/models", "/models"), info.models, "GET"),
        *routes(("/v1/models/{model:path}",), info.model, "GET"),
        *routes(("/v1/chat/completions", "/chat/completions"), chat_completions.chat_completions, "POST"),
        # Anthropic's Messages and OpenAI's Responses, translated onto the chat path (as llama-server)
        *routes(("/v1/messages",), anthropic.messages, "POST"),
        *routes(("/v1/messages/count_tokens",), anthropic.count_tokens, "POST"),
        *routes(("/v1/responses", "/responses"), openai_responses.responses, "POST"),
        *routes(("/v1/responses/input_tokens", "/responses/input_tokens"), openai_responses.input_tokens, "POST"),
        # as llama-server: /completions and /embeddings without /v1 answer in its native shapes
        *routes(("/v1/completions",), completions.completions, "POST"),
        *routes(("/completion", "/completions"), native.completion, "POST"),
        *routes(("/v1/embeddings",), embeddings.embeddings, "POST"),
        *routes(("/embedding", "/embeddings"), embeddings.embedding_native, "POST"),
        *routes(("/rerank", "/v1/rerank", "/reranking", "/v1/reranking"), rerank.rerank, "POST"),
        *routes(("/tokenize",), tokens.tokenize, "POST"),
        *routes(("/detokenize",), tokens.detokenize, "POST"),
        *routes(("/apply-template",), tokens.apply_template, "POST"),
        *routes(("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"), tokens.chat_input_tokens,
                "POST"),
        *routes(("/props",), props_routes.get_props, "GET"),
        *routes(("/props",), props_routes.post_props, "POST"),
        *routes(("/slots",), props_routes.get_slots, "GET"),
        *routes(("/slots/{id_slot}",), props_routes.post_slot, "POST"),
    ]
    middleware = [Middleware(FrontDoor, server=server)]
    if cors is not None:
        middleware.insert(0, Middleware(LlamaCORS, options=cors))  # before the key: a preflight needs none
    middleware.insert(0, Middleware(WireHeaderNames))
    app = Starlette(routes=table, middleware=middleware, exception_handlers=exception_handlers(),
                    lifespan=server.lifespan)
    app.state.server = server
    return app


__all__ = ["create_app", "api_error"]
