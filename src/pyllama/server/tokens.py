"""``POST /tokenize``, ``POST /detokenize`` and ``POST /apply-template``: llama-server's text <-> token id
endpoints, and the prompt of chat messages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from .chat_turn import prompt_tokens
from .errors import api_error
from .native import mixed_tokens
from .protocol import APIError, ChatCompletionRequest, DetokenizeRequest, TokenizeRequest, parse_request
from .responses import json_response
from .state import ServerState

if TYPE_CHECKING:
    from ..engine import Engine


async def tokenize(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()
    return json_response(await server.off_loop(_tokenize, server, engine, await request.body()))


def _tokenize(server: ServerState, engine: Engine, body: bytes) -> dict[str, Any]:
    """The answer of /tokenize (in a worker thread: a long text costs seconds)."""
    req = parse_request(TokenizeRequest, body)
    if req.content is None:
        return {"tokens": []}  # as llama-server
    items = [req.content] if isinstance(req.content, str) else req.content
    toks = mixed_tokens(server, engine, items, add_special=req.add_special, parse_special=req.parse_special).tolist()
    if not req.with_pieces:
        return {"tokens": toks}
    out = []
    for t in toks:
        raw: bytes = server.piece_bytes(t)
        try:
            piece: Any = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)  # llama-server's shape for a piece that is not valid UTF-8 alone
        out.append({"id": t, "piece": piece})
    return {"tokens": out}


async def detokenize(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()
    req = parse_request(DetokenizeRequest, await request.body())
    try:
        text = engine.detokenize(req.tokens)
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    return json_response({"content": text})


async def apply_template(server: ServerState, request: Request) -> Response:
    """``POST /apply-template``: the prompt a chat request's messages make (the server's chat renderer), not
    generated from."""
    await server.ensure_engine()

    def render(body: bytes) -> str:
        req = parse_request(ChatCompletionRequest, body)
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages", code="invalid_messages")
        return server.prompter.plan(req).prompt
    return json_response({"prompt": await server.off_loop(render, await request.body())})


async def chat_input_tokens(server: ServerState, request: Request) -> Response:
    """``POST /v1/chat/completions/input_tokens``: how many tokens a chat request's prompt holds (llama-server's)."""
    await server.ensure_engine()
    req = parse_request(ChatCompletionRequest, await request.body())
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages", code="invalid_messages")
    return json_response({"input_tokens": await prompt_tokens(server, req), "object": "response.input_tokens"})
