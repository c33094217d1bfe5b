"""``/openapi.json``: the server's description, generated from its route table and its models.

Each route of :func:`pyllama.server.create_app` carries a :class:`Doc`: the request model it parses
(:mod:`.protocol` and the modules of Anthropic's and OpenAI's Responses shapes), the model of its answer
(:mod:`.answers`), whether it streams, and the error statuses it may answer. :func:`document` turns the
table into OpenAPI 3.1 with pydantic's JSON schemas, so the description cannot drift from the code that
parses requests; tests/test_server_openapi.py checks that every route is described and runs schemathesis
against a live server to check that every answer matches it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .._version import __version__
from . import answers

# What each status means here (the descriptions of the document's responses).
_STATUS = {
    200: "OK",
    400: "The request is malformed or asks for something this model or server cannot do",
    401: "No API key, or a wrong one (with --api-key)",
    404: "No such model",
    409: "The model is answering requests (unload it first)",
    408: "The request's body stalled (--timeout)",
    413: "The request's body is larger than --max-body-size",
    500: "The model failed to load",
    501: "This endpoint is turned off (its flag was not given)",
    502: "A download from the model's host failed",
    503: "Loading, busy (Retry-After), shutting down, or the isolated worker crashed (Retry-After)",
    507: "Not enough room: disk space for a pull, or memory for the model under the router's budget",
}
# Statuses every POST route may answer before its handler runs or from the engine.
POST_ERRORS = (400, 408, 413, 503)


@dataclass(frozen=True)
class Doc:
    """How one route is described: its summary, the models of its request and answer, its errors."""

    summary: str
    request: type[BaseModel] | None = None
    answer: type[BaseModel] | None = None
    also_lists: tuple[type[BaseModel], ...] = ()  # or a JSON array of one of these
    stream: bool = False  # ``"stream": true`` answers Server-Sent Events instead
    text_stream: str | None = None  # or a stream of JSON lines of this media type (Ollama's NDJSON)
    text: str | None = None  # the answer is text of this media type (no JSON schema)
    errors: tuple[int, ...] = ()
    errors_shape: Literal["openai", "anthropic", "ollama"] = "openai"
    tags: tuple[str, ...] = field(default=())
    #: the router's models: the operation takes ``?model=`` naming one (the request is routed to it)
    routed_to: tuple[str, ...] | None = None


# One Server-Sent Event of a stream (``data`` is a JSON chunk, or ``[DONE]``; comments are keep-alives).
_SSE_EVENT = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                                               "id": {"type": "string"}, "retry": {"type": "integer"}}}

# how each API answers an error
_ERROR_SHAPES: dict[str, type[BaseModel]] = {"openai": answers.ErrorAnswer, "anthropic": answers.AnthropicErrorAnswer,
                                             "ollama": answers.OllamaErrorAnswer}

_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(method: str, path: str, doc: Doc, secured: bool) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": f"{method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}",
                          "summary": doc.summary}
    if doc.tags:
        op["tags"] = list(doc.tags)
    params = [{"name": name, "in": "path", "required": True,
               "schema": {"type": "integer"} if name.startswith("id_") else {"type": "string"}}
              for name in _PARAM.findall(path)]
    if doc.routed_to is not None:  # where the body has no `model`, the query names it
        params.append({"name": "model", "in": "query", "required": False,
                       "schema": {"type": "string", **({"enum": list(doc.routed_to)} if doc.routed_to else {})}})
    if params:
        op["parameters"] = params
    if doc.request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(doc.request)}}}
    ok: dict[str, Any] = {"description": _STATUS[200]}
    content: dict[str, Any] = {}
    if doc.text is not None:
        content[doc.text] = {"schema": {"type": "string"}}
    else:
        shapes = ([_ref(doc.answer)] if doc.answer is not None else []) + \
                 [{"type": "array", "items": _ref(m)} for m in doc.also_lists]
        if shapes:
            content["application/json"] = {"schema": shapes[0] if len(shapes) == 1 else {"anyOf": shapes}}
    if doc.stream:
        content["text/event-stream"] = {"schema": _SSE_EVENT}
    if doc.text_stream is not None:  # one JSON object a line: the answer's shape, line by line
        content[doc.text_stream] = {"schema": {"type": "string"}}
    if content:
        ok["content"] = content
    responses: dict[str, Any] = {"200": ok}
    error = _ERROR_SHAPES[doc.errors_shape]
    statuses = set(doc.errors) | (set(POST_ERRORS) if method == "POST" else set())
    if secured and path not in ("/health", "/v1/health"):
        statuses.add(401)
    for status in sorted(statuses):
        responses[str(status)] = {"description": _STATUS[status],
                                  "content": {"application/json": {"schema": _ref(error)}}}
    op["responses"] = responses
    if secured and path not in ("/health", "/v1/health"):
        op["security"] = [{"bearer": []}, {"x-api-key": []}]
    return op


def document(table: Sequence[tuple[Sequence[str], str, Doc]], *, secured: bool = False,
             title: str = "pyllama serve") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``table`` ((paths, method, doc) per route)."""
    models: dict[str, type[BaseModel]] = {}
    for _, _, doc in table:
        for model in (doc.request, doc.answer, *doc.also_lists):
            if model is not None:
                models[model.__name__] = model
    for model in (answers.ErrorAnswer, answers.AnthropicErrorAnswer, answers.OllamaErrorAnswer):
        models[model.__name__] = model
    requests = {doc.request.__name__ for _, _, doc in table if doc.request is not None}
    _, schemas = models_json_schema(
        [(m, "validation" if name in requests else "serialization") for name, m in sorted(models.items())],
        ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for route_paths, method, doc in table:
        for path in route_paths:
            openapi_path = _PARAM.sub(r"{\1}", path)
            paths.setdefault(openapi_path, {})[method.lower()] = _operation(method, openapi_path, doc, secured)
    components: dict[str, Any] = {"schemas": schemas.get("$defs", {})}
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                         "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
    return {"openapi": "3.1.0",
            "info": {"title": title, "version": __version__,
                     "description": "llama.cpp through pyllama: OpenAI's, Anthropic's and llama-server's APIs."},
            "paths": paths, "components": components}


__all__ = ["Doc", "document", "POST_ERRORS"]
