"""``POST /v1/embeddings`` (OpenAI's shape) and ``POST /embedding`` (llama-server's): texts in, embedding vectors
out."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from .errors import api_error
from .protocol import APIError, EmbeddingRequest, NativeEmbeddingRequest, parse_request
from .responses import json_response
from .state import ServerState


async def embeddings(server: ServerState, request: Request) -> Response:
    engine = server.require_engine()
    req = parse_request(EmbeddingRequest, await request.body())
    server.check_model(req.model)
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise APIError(400, "input must not be empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "input must be text (a string or a list of strings); token ids are not supported",
                       param="input", code="unsupported")
    strs: list[str] = [t for t in texts if isinstance(t, str)]
    if any(not t for t in strs):
        raise APIError(400, "input strings must not be empty", param="input")
    n_embd = engine.model.n_embd
    if req.dimensions is not None and req.dimensions != n_embd:
        raise APIError(400, f"dimensions must be {n_embd} (the model's embedding size)", param="dimensions",
                       code="unsupported")
    try:
        vecs = await engine.aembed(strs, normalize=True)
        n_tokens = sum(int(engine.tokenize(t).size) for t in strs)
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    server.metrics.count_embedding(n_tokens, len(strs))
    data = []
    for i, v in enumerate(np.asarray(vecs, dtype=np.float32)):
        emb: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                    else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return json_response({"object": "list", "data": data, "model": server.model_name,
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


async def embedding_native(server: ServerState, request: Request) -> Response:
    """llama-server's ``POST /embedding`` (and ``/embeddings``): ``content`` (or ``input``), one string or a
    list of them, answered as ``[{"index": i, "embedding": [[...]]}]`` (one row: the pooled vector)."""
    engine = server.require_engine()
    req = parse_request(NativeEmbeddingRequest, await request.body())
    given = req.input if req.input is not None else req.content
    if given is None:
        raise APIError(400, '"input" or "content" must be provided', param="content")
    texts = [given] if isinstance(given, str) else given
    if not texts:
        raise APIError(400, '"input" must not be empty', param="content")
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "content must be text (a string or a list of strings); token ids are not supported",
                       param="content", code="unsupported")
    strs: list[str] = [t for t in texts if isinstance(t, str)]
    if any(not t for t in strs):
        raise APIError(400, "Input content cannot be empty", param="content")
    try:
        vecs = await engine.aembed(strs, normalize=req.embd_normalize == 2)
        n_tokens = sum(int(engine.tokenize(t).size) for t in strs)
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    server.metrics.count_embedding(n_tokens, len(strs))
    return json_response([{"index": i, "embedding": [v.tolist()]}
                          for i, v in enumerate(np.asarray(vecs, dtype=np.float32))])
