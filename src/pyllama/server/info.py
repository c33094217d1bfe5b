"""The read-only endpoints: ``/health``, ``/metrics`` (Prometheus, llama-server's names and pyllama's) and
``/v1/models``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .paths import without_dirs
from .protocol import APIError
from .responses import json_response
from .state import ServerState


async def health(server: ServerState, request: Request) -> Response:
    if server.engine is not None:
        return json_response({"status": "ok"})
    if server.unloaded and not server.loading and server.load_error is None:  # freed on request: loads on demand
        return json_response({"status": "ok"})
    if server.load_error is not None:
        return json_response({"status": "error", "message": without_dirs(str(server.load_error))}, 500)
    return json_response({"status": "loading"}, 503)


async def metrics_endpoint(server: ServerState, request: Request) -> Response:
    if not server.metrics_enabled:  # llama-server's answer without --metrics
        raise APIError(501, "This server does not support metrics endpoint. Start it with `--metrics`",
                       type="not_supported_error", code="not_supported")
    stats = server.engine.stats() if server.engine is not None else None
    # llama-server's names (llamacpp:*) first, then pyllama's own (pyllama_*)
    text = (server.metrics.render_llamacpp(stats)
            + server.metrics.render(stats, model_name=server.model_name, loaded=server.engine is not None))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8",
                             headers={"Process-Start-Time-Unix": str(server.created)})


def _model_card(server: ServerState) -> dict[str, Any]:
    # llama-server's card: every alias given (the id among them) and the --tags
    names = sorted({server.model_name, *server.aliases}) if server.aliases or server.named else []
    card: dict[str, Any] = {"id": server.model_name, "aliases": names, "tags": server.tags, "object": "model",
                            "created": server.created, "owned_by": "pyllama"}
    if server.engine is not None:
        e, m = server.engine, server.engine.model
        # n_ctx: llama-server's name for the context of one slot
        card["meta"] = {"n_slots": e.n_slots, "n_ctx_slot": e.n_ctx_slot, "n_ctx": e.n_ctx_slot,
                        "n_vocab": server.n_vocab, "n_ctx_train": m.n_ctx_train, "n_embd": m.n_embd,
                        "n_params": m.n_params, "size": m.size}
    return card


async def models(server: ServerState, request: Request) -> Response:
    if not server.unloaded:  # an unloaded model is listed (its card without meta), not loaded again
        server.require_engine()
    return json_response({"object": "list", "data": [_model_card(server)]})


async def model(server: ServerState, request: Request) -> Response:
    if not server.unloaded:
        server.require_engine()
    server.find_model(request.path_params["model"])
    return json_response(_model_card(server))
