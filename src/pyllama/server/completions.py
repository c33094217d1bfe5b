"""``POST /v1/completions``: OpenAI's legacy text completions (plain prompt in, text out)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import params, sse
from .chat import schema_grammar
from .protocol import APIError, CompletionRequest, parse_request
from .responses import gone, json_response
from .state import ServerState, finish_reason

if TYPE_CHECKING:
    from ..engine import EngineRequest


async def completions(server: ServerState, request: Request) -> Response:
    engine = server.require_engine()
    req = parse_request(CompletionRequest, await request.body())
    server.check_model(req.model)
    prompt = _completion_prompt(server, req.prompt)
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix", code="unsupported")
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of must be 1", param="best_of", code="unsupported")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported", param="echo", code="unsupported")
    limit = params.max_tokens(req.max_tokens)
    schema = req.response_format.schema_or_none() if req.response_format is not None else None
    grammar = schema_grammar(schema) if schema is not None else None
    sampler = params.sampler_specs(req, server.n_vocab, grammar=grammar)
    want_lp = req.logprobs is not None
    er = server.submit(engine, prompt, max_tokens=limit, stop=req.stops(), sampler=sampler, logprobs=want_lp,
                     top_logprobs=req.logprobs or 0, add_special=True, parse_special=True,
                     ignore_eos=req.ignore_eos)
    echo = ""
    if req.echo:
        echo = prompt if isinstance(prompt, str) else engine.detokenize(prompt)
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_completion_stream(server, er, rid, want_lp, echo, usage),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    evs = await server.collect(request, er)
    if evs is None:
        return gone()
    text = "".join(ev.text for ev in evs)
    choice: dict[str, Any] = {"index": 0, "text": echo + text, "logprobs": None,
                              "finish_reason": finish_reason(er)}
    if want_lp:
        choice["logprobs"] = server.completion_logprobs([ev for ev in evs if ev.token >= 0], len(echo))
    return json_response({"id": rid, "object": "text_completion", "created": int(time.time()),
                          "model": server.model_name, "choices": [choice], "usage": server.usage(er)})


def _completion_prompt(server: ServerState, prompt: Any) -> str | np.ndarray[Any, np.dtype[np.int32]]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return prompt
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if not isinstance(prompt[0], int):
        raise APIError(400, "one prompt per request: send several requests (they are batched together)",
                       param="prompt", code="unsupported")
    tokens = np.asarray(prompt, dtype=np.int64)
    if int(tokens.min()) < 0 or int(tokens.max()) >= server.n_vocab:
        bad = int(tokens[(tokens < 0) | (tokens >= server.n_vocab)][0])
        raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {server.n_vocab})",
                       param="prompt", code="invalid_token")
    return tokens.astype(np.int32)


def _completion_stream(server: ServerState, er: EngineRequest, rid: str, logprobs: bool, echo: str,
                       include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.model_name}

    def chunk(text: str, finish: str | None = None, lps: dict[str, Any] | None = None) -> bytes:
        obj: dict[str, Any] = {**base, "choices": [{"index": 0, "text": text, "logprobs": lps,
                                                    "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return sse.frame(obj)

    async def frames() -> AsyncGenerator[bytes, None]:
        offset = len(echo)
        if echo:
            yield chunk(echo)
        async for ev in server.events(er, keepalive=True):
            if ev is None:
                yield sse.KEEPALIVE
                continue
            lps = server.completion_logprobs([ev], offset) if logprobs and ev.token >= 0 else None
            if ev.text or lps:
                yield chunk(ev.text, lps=lps)
            offset += len(ev.text)
        yield chunk("", finish_reason(er))

    return server.stream(er, rid, frames(), base if include_usage else None)
