"""``POST /v1/completions``: OpenAI's legacy text completions (prompts in, text out; ``n`` choices each)."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import TokenizationError
from ..vocab import as_tokens
from . import params, sse
from .chat import schema_grammar
from .protocol import APIError, CompletionRequest, parse_request
from .responses import gone, json_response
from .state import ServerState, finish_reason, interleave

if TYPE_CHECKING:
    from ..engine import Engine, EngineRequest


def _prepare(server: ServerState, engine: Engine, body: bytes) -> tuple[CompletionRequest, list[Any], list[Any],
                                                                        int | None, Any, int, dict[str, Any]]:
    """Everything before the engine sees the request (in a worker thread: a large body costs seconds)."""
    req = parse_request(CompletionRequest, body)
    server.check_model(req.model)
    prompts = _completion_prompts(server, req.prompt)
    if req.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix", code="unsupported")
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of must be 1", param="best_of", code="unsupported")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported", param="echo", code="unsupported")
    limit = params.max_tokens(req, "max_tokens", default=server.defaults.max_tokens)
    schema = req.response_format.schema_or_none() if req.response_format is not None else None
    grammar = schema_grammar(schema, engine.model) if schema is not None else None
    sampler = params.sampler_specs(req, server.n_vocab, grammar=grammar, defaults=server.defaults)
    n = params.choices(req.n, engine.n_slots)
    settings = params.native_settings(req, server.defaults)
    tokens = [server.prompt_ids(engine, p, add_special=True, parse_special=True) for p in prompts]
    return req, prompts, tokens, limit, sampler, n, settings


async def completions(server: ServerState, request: Request) -> Response:
    engine = await server.ensure_engine()
    req, prompts, tokens, limit, sampler, n, settings = await server.off_loop(_prepare, server, engine,
                                                                              await request.body())
    want_lp = req.logprobs is not None
    # a list of prompts and n choices: one choice each, prompt by prompt (choice index = prompt * n + k)
    ers: list[EngineRequest] = []
    echoes: list[str] = []
    try:
        with engine.together():  # a list of prompts is prefilled in one batch, as in llama-server
            for prompt, ids in zip(prompts, tokens):
                ers += server.submit_n(engine, ids, n, settings, max_tokens=limit, stop=req.stops(),
                                       sampler=sampler, logprobs=want_lp, top_logprobs=req.logprobs or 0,
                                       ignore_eos=req.ignore_eos, lora=params.lora_scales(req.lora, len(engine.lora)))
                echo = (prompt if isinstance(prompt, str) else engine.detokenize(prompt)) if req.echo else ""
                echoes += [echo] * n
    except BaseException:
        for er in ers:
            er.cancel()
        raise
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_completion_stream(server, ers, rid, want_lp, echoes, usage),
                                 media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    got = await server.collect_all(request, ers)
    if got is None:
        return gone()
    choices = []
    for i, (er, evs, echo) in enumerate(zip(ers, got, echoes)):
        text = "".join(ev.text for ev in evs)
        choice: dict[str, Any] = {"index": i, "text": echo + text, "logprobs": None,
                                  "finish_reason": finish_reason(er)}
        if want_lp:
            choice["logprobs"] = server.completion_logprobs([ev for ev in evs if ev.token >= 0], len(echo))
        choices.append(choice)
    used = server.usage_all(ers) if len(prompts) == 1 else _usage_sum(server, ers)
    return json_response({"id": rid, "object": "text_completion", "created": int(time.time()),
                          "model": server.model_name, "system_fingerprint": server.fingerprint, "choices": choices,
                          "usage": used, "timings": server.timings(ers[0])})


def _usage_sum(server: ServerState, ers: list[EngineRequest]) -> dict[str, Any]:
    out = server.usage(ers[0])
    for er in ers[1:]:
        more = server.usage(er)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            out[key] += more[key]
        out["prompt_tokens_details"]["cached_tokens"] += more["prompt_tokens_details"]["cached_tokens"]
    return out


def _completion_prompts(server: ServerState, prompt: Any) -> list[str | np.ndarray[Any, np.dtype[np.int32]]]:
    """OpenAI's prompt forms: a string, token ids, or a list of either (one choice each)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return [_completion_prompt(server, p) for p in prompt]
    return [_completion_prompt(server, prompt)]


def _completion_prompt(server: ServerState, prompt: Any) -> str | np.ndarray[Any, np.dtype[np.int32]]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return prompt
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if not all(isinstance(t, int) for t in prompt):
        raise APIError(400, "prompt must be a string, token ids, or a list of either", param="prompt")
    try:
        tokens = as_tokens(prompt)
    except TokenizationError as exc:
        raise APIError(400, f"prompt: {exc}", param="prompt", code="invalid_token") from None
    if int(tokens.min()) < 0 or int(tokens.max()) >= server.n_vocab:
        bad = int(tokens[(tokens < 0) | (tokens >= server.n_vocab)][0])
        raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {server.n_vocab})",
                       param="prompt", code="invalid_token")
    return tokens


def _completion_stream(server: ServerState, ers: list[EngineRequest], rid: str, logprobs: bool, echoes: list[str],
                       include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": server.model_name,
            "system_fingerprint": server.fingerprint}

    def chunk(index: int, text: str, finish: str | None = None, lps: dict[str, Any] | None = None,
              timings: dict[str, Any] | None = None) -> bytes:
        obj: dict[str, Any] = {**base, "choices": [{"index": index, "text": text, "logprobs": lps,
                                                    "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        if timings is not None:
            obj["timings"] = timings  # llama-server's, on the last chunk
        return sse.frame(obj)

    async def frames(index: int, er: EngineRequest, echo: str) -> AsyncGenerator[bytes, None]:
        offset = len(echo)
        if echo:
            yield chunk(index, echo)
        async for ev in server.events(er, keepalive=len(ers) == 1):
            if ev is None:
                yield sse.KEEPALIVE
                continue
            lps = server.completion_logprobs([ev], offset) if logprobs and ev.token >= 0 else None
            if ev.text or lps:
                yield chunk(index, ev.text, lps=lps)
            offset += len(ev.text)
        yield chunk(index, "", finish_reason(er), timings=server.timings(er))

    parts = [frames(i, er, echo) for i, (er, echo) in enumerate(zip(ers, echoes))]
    merged = parts[0] if len(parts) == 1 else interleave(parts)
    return server.stream(ers, rid, merged, base if include_usage else None)
