"""``POST /v1/embeddings`` (OpenAI's shape) and ``POST /embedding(s)`` (llama-server's): inputs in, embedding
vectors out.

One handler for both, as in llama-server (``handle_embeddings_impl``): an input is any of its prompt forms
(see :func:`embedding_prompts`), tokenized with the special tokens; a request that names ``content``
instead of ``input`` is answered in the native shape on either path. The native answer is normalised
unless ``embd_normalize`` says otherwise (only 2, the Euclidean norm, or -1, none, are taken).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from starlette.requests import Request
from starlette.responses import Response

from .errors import api_error
from .native import native_prompts
from .protocol import APIError, EmbeddingRequest, parse_request
from .responses import json_response
from .state import ServerState

if TYPE_CHECKING:
    from ..engine import Engine


def _content_parts(server: ServerState, engine: Engine, parts: Any) -> npt.NDArray[np.int32]:
    """``{"content": [{"type": "text", "text": ...}, ...]}``: the text parts, joined (the model reads no media)."""
    if not isinstance(parts, list):
        raise APIError(400, '"content" must be a list of content parts', param="input")
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio", "input_video"):
            raise APIError(400, f"the model reads no media ({kind} given)", param="input", code="unsupported")
        else:
            raise APIError(400, f"unsupported content part type {kind!r}", param="input")
    return _tokens_only(native_prompts(server, engine, "".join(texts))[0])


def _tokens_only(prompt: Any) -> npt.NDArray[np.int32]:
    """A prompt's token ids; media (multimodal_data) are not embedded here: a 400."""
    if not isinstance(prompt, np.ndarray):
        raise APIError(400, "embeddings read no media (multimodal_data given)", param="input", code="unsupported")
    return prompt


def embedding_prompts(server: ServerState, engine: Engine, given: Any) -> list[npt.NDArray[np.int32]]:
    """The token sequences of an embedding request's ``input``: llama-server's prompt forms, plus OpenAI's
    content parts; a list without token ids is several inputs."""
    def one(p: Any) -> npt.NDArray[np.int32]:
        if isinstance(p, dict) and "content" in p:
            return _content_parts(server, engine, p["content"])
        return _tokens_only(native_prompts(server, engine, p)[0])

    if isinstance(given, list) and not any(isinstance(x, int) and not isinstance(x, bool) for x in given):
        if not given:
            raise APIError(400, '"input" must not be empty', param="input")
        prompts = [one(p) for p in given]
    else:
        prompts = [one(given)]
    if any(not p.size for p in prompts):
        raise APIError(400, "Input content cannot be empty", param="input")
    return prompts


async def _embed(server: ServerState, request: Request, *, oai: bool) -> Response:
    engine = await server.ensure_engine()
    req = parse_request(EmbeddingRequest, await request.body())
    if req.input is not None:
        given = req.input
    elif req.content is not None:
        given, oai = req.content, False  # "content" is llama-server's field: its answer shape
    else:
        raise APIError(400, '"input" or "content" must be provided', param="input")
    if oai:
        server.check_model(req.model)
    if engine.pooling == "none":
        raise APIError(400, "this server embeds with pooling 'none' (one vector per token), which neither "
                       "answer shape here carries: start it with another --pooling", param="input",
                       code="unsupported")
    n_embd = engine.model.n_embd
    if req.dimensions is not None and req.dimensions != n_embd:
        raise APIError(400, f"dimensions must be {n_embd} (the model's embedding size)", param="dimensions",
                       code="unsupported")
    normalize = req.embd_normalize if req.embd_normalize is not None else 2
    if normalize not in (-1, 2):
        raise APIError(400, "embd_normalize must be 2 (Euclidean) or -1 (none)", param="embd_normalize",
                       code="unsupported")
    prompts = await server.off_loop(embedding_prompts, server, engine, given)  # tokenizing: off the event loop
    try:
        vecs = np.asarray(await engine.aembed(prompts, normalize=normalize == 2), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    n_tokens = sum(int(p.size) for p in prompts)
    server.metrics.count_embedding(n_tokens, len(prompts))
    if not oai:
        return json_response([{"index": i, "embedding": [v.tolist()]} for i, v in enumerate(vecs)])
    data = []
    for i, v in enumerate(vecs):
        emb: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                    else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return json_response({"object": "list", "data": data, "model": server.model_name,
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


async def embeddings(server: ServerState, request: Request) -> Response:
    """OpenAI's ``POST /v1/embeddings``."""
    return await _embed(server, request, oai=True)


async def embedding_native(server: ServerState, request: Request) -> Response:
    """llama-server's ``POST /embedding`` (and ``/embeddings``): ``[{"index": i, "embedding": [[...]]}]`` (one
    row: the pooled vector)."""
    return await _embed(server, request, oai=False)


__all__ = ["embeddings", "embedding_native", "embedding_prompts"]
