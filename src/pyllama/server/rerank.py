"""``POST /rerank`` (and ``/v1/rerank``, ``/reranking``, ``/v1/reranking``): llama-server's reranking.

Jina's request and answer (``query``, ``documents``, ``top_n`` -> ``results`` of ``index`` and
``relevance_score``, best first, with ``usage``) or, when the request names ``texts``, Hugging Face TEI's
(a list of ``index`` and ``score``, ``text`` with ``return_text``). The scores come from the engine's
embedding path under rank pooling (a reranker model, or ``--reranking``); any other server answers 501,
as llama-server does.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .errors import api_error
from .protocol import APIError
from .responses import json_response
from .state import ServerState


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:  # the other routes' parser (pydantic's) stops at depth 200 the same way
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def rerank(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()
    if engine.pooling != "rank":
        raise APIError(501, "This server does not support reranking. Start it with `--reranking`",
                       type="not_supported_error", code="not_supported")
    body = _body(await request.body())
    tei = "texts" in body
    query = body.get("query")
    if not isinstance(query, str):
        raise APIError(400, '"query" must be provided' if query is None else '"query" must be a string',
                       param="query")
    documents = body.get("documents", body.get("texts"))
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise APIError(400, '"documents" must be a non-empty string array', param="documents")
    top_n = body.get("top_n", len(documents))
    if top_n is None:
        top_n = len(documents)
    if not isinstance(top_n, int) or isinstance(top_n, bool):
        raise APIError(400, '"top_n" must be an integer', param="top_n")
    try:
        prompts = await server.off_loop(engine.rerank_prompts, query, documents)
        scores = await engine.arerank(prompts)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise api_error(exc) from None
    n_tokens = sum(int(p.size) for p in prompts)
    server.metrics.count_embedding(n_tokens, len(prompts))
    label = "score" if tei else "relevance_score"
    ranked = sorted(range(len(documents)), key=lambda i: -float(scores[i]))[:max(top_n, 0)]
    results: list[dict[str, Any]] = []
    for i in ranked:
        item: dict[str, Any] = {"index": i, label: float(scores[i])}
        if tei and body.get("return_text") is True:
            item["text"] = documents[i]
        results.append(item)
    if tei:
        return json_response(results)
    return json_response({"model": body.get("model") if isinstance(body.get("model"), str) else server.model_name,
                          "object": "list", "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                          "results": results})


__all__ = ["rerank"]
