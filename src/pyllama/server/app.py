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

import os
from typing import Any, Awaitable, Callable, Literal, Mapping, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..chat import ReasoningFormat
from . import chat_completions, completions, embeddings, info, native, rerank, tokens
from . import lora_adapters, ollama, ollama_models
from . import props as props_routes  # (``props`` is create_app's switch)
from . import anthropic, answers, openai_responses
from .cors import CORSOptions, LlamaCORS
from .errors import api_error, exception_handlers
from .front_door import FrontDoor, WireHeaderNames
from .openapi import Doc, document
from .params import RequestDefaults
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                       InfillRequest, LoraScalesRequest, NativeCompletionRequest, RerankRequest, SlotActionRequest, TokenizeRequest)
from .responses import json_response
from .state import EngineSource, ServerState

Endpoint = Callable[[ServerState, Request], Awaitable[Response]]

A = answers
_ENGINE_DOWN = (503,)

#: every route of a model's app: (paths, handler, method, how /openapi.json describes it); the router's
#: document lists them too, routed by the request's model
ROUTES: list[tuple[tuple[str, ...], Endpoint, str, Doc]] = [
    (("/health", "/v1/health"), info.health, "GET",
        Doc("Whether the model is loaded", answer=A.Health, errors=(500, 503))),
    (("/metrics",), info.metrics_endpoint, "GET",
        Doc("Prometheus metrics (llama-server's llamacpp: names, then pyllama_)",
            text="text/plain", errors=(501,))),
    (("/v1/models", "/models"), info.models, "GET",
        Doc("The model", answer=A.ModelList, errors=_ENGINE_DOWN)),
    (("/v1/models/{model:path}",), info.model, "GET",
        Doc("One model by name", answer=A.ModelCard, errors=(404, 503))),
    (("/v1/chat/completions", "/chat/completions"), chat_completions.chat_completions, "POST",
        Doc("OpenAI chat completion", request=ChatCompletionRequest, answer=A.ChatCompletion, stream=True)),
    # Anthropic's Messages and OpenAI's Responses, translated onto the chat path (as llama-server)
    (("/v1/messages",), anthropic.messages, "POST",
        Doc("Anthropic Messages", request=anthropic.MessagesRequest, answer=A.AnthropicMessageOut,
            stream=True, errors_shape="anthropic")),
    (("/v1/messages/count_tokens",), anthropic.count_tokens, "POST",
        Doc("Anthropic token count", request=anthropic.MessagesRequest, answer=A.InputTokens,
            errors_shape="anthropic")),
    (("/v1/responses", "/responses"), openai_responses.responses, "POST",
        Doc("OpenAI Responses", request=openai_responses.ResponsesRequest, answer=A.ResponseObject,
            stream=True)),
    (("/v1/responses/input_tokens", "/responses/input_tokens"), openai_responses.input_tokens, "POST",
        Doc("OpenAI Responses token count", request=openai_responses.ResponsesRequest,
            answer=A.InputTokens)),
    # as llama-server: /completions and /embeddings without /v1 answer in its native shapes
    (("/v1/completions",), completions.completions, "POST",
        Doc("OpenAI text completion", request=CompletionRequest, answer=A.Completion, stream=True)),
    (("/infill",), native.infill, "POST",
        Doc("Fill in the middle (a model without FIM tokens: 501)", request=InfillRequest,
            answer=A.NativeCompletion, also_lists=(A.NativeCompletion,), stream=True,
            errors=(400, 501, 503))),
    (("/completion", "/completions"), native.completion, "POST",
        Doc("llama-server's completion", request=NativeCompletionRequest, answer=A.NativeCompletion,
            also_lists=(A.NativeCompletion,), stream=True)),
    (("/v1/embeddings",), embeddings.embeddings, "POST",
        Doc("OpenAI embeddings (llama-server's shape when the input is given as content)",
            request=EmbeddingRequest, answer=A.EmbeddingList, also_lists=(A.NativeEmbedding,))),
    (("/embedding", "/embeddings"), embeddings.embedding_native, "POST",
        Doc("llama-server's embeddings", request=EmbeddingRequest, also_lists=(A.NativeEmbedding,))),
    (("/rerank", "/v1/rerank", "/reranking", "/v1/reranking"), rerank.rerank, "POST",
        Doc("Rerank documents against a query (a reranker, --reranking)", request=RerankRequest,
            answer=A.Rerank, also_lists=(A.RerankResult,), errors=(501,))),  # a list: TEI's shape
    (("/tokenize",), tokens.tokenize, "POST", Doc("Tokenize", request=TokenizeRequest, answer=A.Tokens)),
    (("/detokenize",), tokens.detokenize, "POST",
        Doc("Detokenize", request=DetokenizeRequest, answer=A.Detokenized)),
    (("/apply-template",), tokens.apply_template, "POST",
        Doc("The prompt a chat renders to", request=ChatCompletionRequest, answer=A.RenderedPrompt)),
    (("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"), tokens.chat_input_tokens,
        "POST", Doc("A chat's prompt tokens", request=ChatCompletionRequest, answer=A.InputTokens)),
    (("/lora-adapters",), lora_adapters.get_lora_adapters, "GET",
        Doc("The LoRA adapters and the scales requests get", also_lists=(A.LoraAdapter,),
            errors=_ENGINE_DOWN)),
    (("/lora-adapters",), lora_adapters.post_lora_adapters, "POST",
        Doc("Set the LoRA scales of requests from now on ([{id, scale}])", request=LoraScalesRequest,
            answer=A.Success, errors=(400,))),
    (("/api/chat",), ollama.chat, "POST",
        Doc("Ollama's chat (NDJSON stream unless stream is false)", request=ollama.OllamaChatRequest,
            answer=A.OllamaChat, text_stream=ollama.NDJSON, errors=(404, 500), errors_shape="ollama")),
    (("/api/generate",), ollama.generate, "POST",
        Doc("Ollama's generate (NDJSON stream unless stream is false)", request=ollama.OllamaGenerateRequest,
            answer=A.OllamaGenerate, text_stream=ollama.NDJSON, errors=(404, 500), errors_shape="ollama")),
    (("/api/embed",), ollama.embed, "POST",
        Doc("Ollama's embeddings (L2-normalised)", request=ollama.OllamaEmbedRequest,
            answer=A.OllamaEmbed, errors=(500,), errors_shape="ollama")),
    (("/api/embeddings",), ollama.embeddings, "POST",
        Doc("Ollama's older embedding route", request=ollama.OllamaEmbeddingsRequest,
            answer=A.OllamaEmbedding, errors=(500,), errors_shape="ollama")),
    (("/api/tags",), ollama_models.tags, "GET",
        Doc("Ollama's model list", answer=A.OllamaModels, errors=(500, 503), errors_shape="ollama")),
    (("/api/ps",), ollama_models.ps, "GET",
        Doc("Ollama's loaded models", answer=A.OllamaModels, errors=(500,), errors_shape="ollama")),
    (("/api/show",), ollama_models.show, "POST",
        Doc("Ollama's model details", request=ollama_models.OllamaModelRequest, answer=A.OllamaShow,
            errors=(404, 500), errors_shape="ollama")),
    (("/api/version",), ollama_models.version, "GET",
        Doc("Ollama's version route", answer=A.OllamaVersion, errors_shape="ollama")),
    (("/api/pull",), ollama_models.pull, "POST",
        Doc("Pull a model into the store (Ollama's status stream unless stream is false)",
            request=ollama_models.OllamaModelRequest, answer=A.OllamaStatus, text_stream=ollama.NDJSON,
            errors=(404, 500, 502, 507), errors_shape="ollama")),
    (("/api/delete",), ollama_models.delete, "DELETE",
        Doc("Remove a model from the store (or a name made by copy or create)",
            request=ollama_models.OllamaModelRequest, errors=(400, 404, 500, 502), errors_shape="ollama")),
    (("/api/copy",), ollama_models.copy, "POST",
        Doc("Another name for the served model (kept while the server runs)",
            request=ollama_models.OllamaCopyRequest, errors=(400, 404), errors_shape="ollama")),
    (("/api/create",), ollama_models.create, "POST",
        Doc("A name made from the served model with its own system prompt, default parameters and messages "
            "(Ollama's status stream unless stream is false)", request=ollama_models.OllamaCreateRequest,
            answer=A.OllamaStatus, text_stream=ollama.NDJSON, errors=(400, 404), errors_shape="ollama")),
    (("/api/push",), ollama_models.push, "POST",
        Doc("Push to a registry: not supported (501)", request=ollama_models.OllamaModelRequest,
            errors=(501,), errors_shape="ollama")),
    (("/props",), props_routes.get_props, "GET",
        Doc("llama-server's server properties", answer=A.Props, errors=_ENGINE_DOWN)),
    (("/props",), props_routes.post_props, "POST", Doc("Change properties (--props)", answer=A.Success,
                                                         errors=(501,))),
    (("/slots",), props_routes.get_slots, "GET", Doc("The slots (--no-slots: 501)", errors=(501, 503))),
    (("/slots/{id_slot}",), props_routes.post_slot, "POST",
        Doc("Save, restore or erase a slot's cache (?action=; --slot-save-path, else 501)",
            request=SlotActionRequest, answer=A.SlotAction, errors=(400, 500, 501))),
]


#: what /openapi.json describes: (paths, method, doc) per route
DESCRIBED: list[tuple[Sequence[str], str, Doc]] = [(paths, method, doc) for paths, _, method, doc in ROUTES]


def create_app(engine: EngineSource, *, api_key: str | Sequence[str] | None = None, model_name: str | None = None,
               keepalive_s: float = 10.0, chat_template: str | None = None, aliases: Sequence[str] = (),
               defaults: RequestDefaults | None = None, metrics: bool = True,
               cors: CORSOptions | None = None, reasoning_format: ReasoningFormat = "auto", slots: bool = True,
               props: bool = False, reasoning: Literal["on", "off", "auto"] = "auto",
               chat_template_kwargs: Mapping[str, Any] | None = None, verbose: bool = False,
               tags: Sequence[str] = (), jinja: bool = True, max_body_size: int | None = None,
               read_timeout: float = 600.0, slot_save_path: str | os.PathLike[str] | None = None,
               spm_infill: bool = False, load_at_start: bool = True,
               media_path: str | os.PathLike[str] | None = None) -> Starlette:
    """The OpenAI-compatible app over ``engine``.

    ``engine`` is an :class:`~pyllama.engine.Engine` (the caller keeps owning
    it) or a callable that builds one: it is then called in a background
    thread at startup (``/health`` answers 503 ``{"status": "loading"}``
    meanwhile) and the app closes the engine and its model at shutdown.
    ``api_key`` (one key or several) makes every endpoint but ``/health``
    require ``Authorization: Bearer <key>`` (``/openapi.json`` neither); ``model_name`` is the id
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
    ``--timeout``, 600 s). ``media_path`` is the directory ``file://`` image and audio URLs are read from
    (llama-server's ``--media-path``; without it they are refused). ``slot_save_path`` is the directory ``POST /slots/{id}?action=save|restore``
    reads and writes (its ``--slot-save-path``; file names are confined to it; without it: 501);
    ``spm_infill`` puts the suffix first in ``/infill``'s prompt (its ``--spm-infill``).
    ``load_at_start=False`` loads the model on the first request that needs it (the router's models).
    ``app.state.server`` exposes
    ``on_load_error`` (callbacks run when the loader fails).
    """
    server = ServerState(engine, api_key=api_key, model_name=model_name, keepalive_s=keepalive_s,
                         chat_template=chat_template, aliases=aliases, defaults=defaults or RequestDefaults(),
                         metrics=metrics, reasoning_format=reasoning_format, slots=slots, props=props,
                         thinking=reasoning != "off", chat_template_kwargs=chat_template_kwargs,
                         verbose=verbose, tags=tags, jinja=jinja, max_body_size=max_body_size,
                         read_timeout=read_timeout, slot_save_path=slot_save_path, spm_infill=spm_infill,
                         media_path=media_path)
    if not load_at_start and server.loader is not None:
        server.unloaded = True  # loaded on demand, by the first request that needs it

    def bound(handler: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        # A plain function (not a partial), so Starlette treats it as a request/response endpoint.
        async def endpoint(request: Request) -> Response:
            return await handler(server, request)
        return endpoint

    def routes(paths: Sequence[str], handler: Endpoint, method: str) -> list[Route]:
        endpoint = bound(handler)
        return [Route(path, endpoint, methods=[method]) for path in paths]

    table = [route for paths, handler, method, _ in ROUTES for route in routes(paths, handler, method)]
    openapi: list[Response] = []  # built on first request, once

    async def openapi_json(srv: ServerState, request: Request) -> Response:
        if not openapi:
            openapi.append(json_response(document(DESCRIBED, secured=bool(srv.api_keys))))
        return openapi[0]

    table.append(Route("/openapi.json", bound(openapi_json), methods=["GET"]))
    middleware = [Middleware(FrontDoor, server=server)]
    if cors is not None:
        middleware.insert(0, Middleware(LlamaCORS, options=cors))  # before the key: a preflight needs none
    middleware.insert(0, Middleware(WireHeaderNames))
    app = Starlette(routes=table, middleware=middleware, exception_handlers=exception_handlers(),
                    lifespan=server.lifespan)
    app.state.server = server
    return app


__all__ = ["create_app", "api_error"]
