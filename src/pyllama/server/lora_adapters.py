"""``GET``/``POST /lora-adapters``: the server's LoRA adapters (``--lora``, ``--lora-scaled``) and the scales
requests get unless they name their own, as llama-server has them."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import Response

from . import params
from .protocol import APIError
from .responses import json_response
from .state import ServerState


async def get_lora_adapters(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()
    return json_response([{"id": i, "path": path, "scale": scale, "task_name": "", "prompt_prefix": ""}
                          for i, (path, scale) in enumerate(engine.lora)])


async def post_lora_adapters(server: ServerState, request: Request) -> Response:
    """Set the scales (``[{"id", "scale"}]``; an adapter not listed: 0) of requests from now on."""
    engine = await server.ensure_engine()
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, list):
        raise APIError(400, "Request body must be an array")
    scales = params.lora_scales(body, len(engine.lora), param="body")
    assert scales is not None
    await asyncio.to_thread(engine.set_lora_scales, scales)
    return json_response({"success": True})


__all__ = ["get_lora_adapters", "post_lora_adapters"]
