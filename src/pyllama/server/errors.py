"""Errors in OpenAI's shape: mapping exceptions to API errors, and the app's exception handlers."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ClosedError, ContextOverflowError, LlamaError, SamplerError, TemplateError, TokenizationError
from .protocol import APIError, error_body
from .responses import json_response

log = logging.getLogger("pyllama.server")


def error_response(err: APIError) -> Response:
    """The HTTP response for ``err``."""
    return json_response(err.body(), err.status, err.headers)


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); anything else is "api_error"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(err: APIError) -> dict[str, Any]:
    """``err`` in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(err.status, "api_error"),
                                       "message": err.message}}


def anthropic_error_response(err: APIError) -> Response:
    """The HTTP response for ``err`` on Anthropic's routes."""
    return json_response(anthropic_error_body(err), err.status, err.headers)


def ollama_error_response(err: APIError) -> Response:
    """The HTTP response for ``err`` on Ollama's routes: ``{"error": "..."}``."""
    return json_response({"error": err.message}, err.status, err.headers)


def error_response_for(path: str) -> Callable[[APIError], Response]:
    """How the route at ``path`` answers an error: Anthropic's, Ollama's or OpenAI's shape."""
    if path.startswith("/v1/messages"):
        return anthropic_error_response
    if path.startswith("/api/"):
        return ollama_error_response
    return error_response


def api_error(exc: BaseException) -> APIError:
    """Map an exception from the engine or the library to the answer the client gets."""
    from ..engine import EngineBusyError
    from ..worker.errors import WorkerCrashedError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, WorkerCrashedError):
        # --isolate: the request died with the worker; the next one runs on a fresh worker
        return APIError(503, f"generation failed: {exc}", type="server_error", code=type(exc).__name__,
                        headers={"Retry-After": "1"})
    if isinstance(exc, EngineBusyError):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return APIError(503, f"the server is busy: {exc}", type="server_error", code="server_busy",
                        headers={"Retry-After": retry})
    if isinstance(exc, ClosedError):
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if isinstance(exc, ContextOverflowError):
        # llama-server's type (its tests check it); OpenAI's code
        return APIError(400, str(exc), type="exceed_context_size_error", code="context_length_exceeded")
    if isinstance(exc, TokenizationError):
        return APIError(400, str(exc), code="invalid_token")
    if isinstance(exc, (SamplerError, TemplateError)):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, OverflowError):  # a request's number past what llama.cpp's C types hold
        return APIError(400, f"a number in the request is out of range: {exc}", code="invalid_value")
    if isinstance(exc, LlamaError):
        return APIError(500, f"generation failed: {exc}", type="server_error", code=type(exc).__name__)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return json_response(error_body(str(exc.detail), type=kind, code=str(exc.status_code)), exc.status_code,
                         dict(exc.headers or {}))


async def _on_other_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(api_error(exc))


def exception_handlers() -> dict[Any, Callable[[Request, Exception], Any]]:
    """Starlette's exception handlers: every error a client sees has OpenAI's shape."""
    return {APIError: _on_api_error, HTTPException: _on_http_error, Exception: _on_other_error}
