"""``POST /tokenize``, ``POST /detokenize`` and ``POST /apply-template``: llama-server's text <-> token id
endpoints, and the prompt of chat messages."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .errors import api_error
from .native import mixed_tokens
from .protocol import APIError, ChatCompletionRequest, DetokenizeRequest, TokenizeRequest, parse_request
from .responses import json_response
from .state import ServerState


async def tokenize(server: ServerState, request: Request) -> Response:
    engine = server.require_engine()
    req = parse_request(TokenizeRequest, await request.body())
    if req.content is None:
        return json_response({"tokens": []})  # as llama-server
    items = [req.content] if isinstance(req.content, str) else req.content
    toks = mixed_tokens(server, engine, items, add_special=req.add_special, parse_special=req.parse_special).tolist()
    if not req.with_pieces:
        return json_response({"tokens": toks})
    out = []
    for t in toks:
        raw: bytes = server.piece_bytes(t)
        try:
            piece: Any = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)  # llama-server's shape for a piece that is not valid UTF-8 alone
        out.append({"id": t, "piece": piece})
    return json_response({"tokens": out})


async def detokenize(server: ServerState, request: Request) -> Response:
    engine = server.require_engine()
    req = parse_request(DetokenizeRequest, await request.body())
    try:
        text = engine.detokenize(req.tokens)
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    return json_response({"content": text})


async def apply_template(server: ServerState, request: Request) -> Response:
    """``POST /apply-template``: the prompt a chat request's messages make (the server's chat renderer), not
    generated from."""
    server.require_engine()
    req = parse_request(ChatCompletionRequest, await request.body())
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="invalid_messages")
    plan = server.prompter.plan(req)
    return json_response({"prompt": plan.prompt})


async def chat_input_tokens(server: ServerState, request: Request) -> Response:
    """``POST /v1/chat/completions/input_tokens``: how many tokens a chat request's prompt holds (llama-server's)."""
    engine = server.require_engine()
    req = parse_request(ChatCompletionRequest, await request.body())
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="invalid_messages")
    plan = server.prompter.plan(req)
    try:
        n = int(engine.tokenize(plan.prompt, add_special=plan.add_special, parse_special=True).size)
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    return json_response({"input_tokens": n, "object": "response.input_tokens"})
