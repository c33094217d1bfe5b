"""``POST /tokenize`` and ``POST /detokenize``: llama-server's text <-> token id endpoints."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .errors import api_error
from .protocol import DetokenizeRequest, TokenizeRequest, parse_request
from .responses import json_response
from .state import ServerState


async def tokenize(server: ServerState, request: Request) -> Response:
    engine = server.require_engine()
    req = parse_request(TokenizeRequest, await request.body())
    try:
        toks = engine.tokenize(req.content, add_special=req.add_special, parse_special=req.parse_special)
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    if not req.with_pieces:
        return json_response({"tokens": toks.tolist()})
    out = []
    for t in toks.tolist():
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
